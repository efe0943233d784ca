"""One registry helper for adaptors, tasks and backbones: name -> object, duplicates refused."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar
from mtcpeft.errors import MtcpeftError

T = TypeVar("T")


class UnknownNameError(MtcpeftError, KeyError):
    """A lookup of a name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would print the message inside quotes
        return str(self.args[0])


class Registry(Generic[T]):
    """A named table filled by a decorator; lookups of unknown names list the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice; pick another name")
            self._items[name] = obj
            return obj

        return add

    def unregister(self, name: str) -> T:
        """Remove and return ``name`` (a kind registered for a test or a session only)."""
        return self._items.pop(name)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
