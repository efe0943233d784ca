"""One error base class: every user error is an MtcpeftError, and the launch scripts print it as one line."""
import importlib
import inspect
import pkgutil

import pytest

import mtcpeft
from mtcpeft.cli import run_cli
from mtcpeft.config import ConfigError
from mtcpeft.errors import MtcpeftError

NOT_USER_ERRORS: set[str] = set()  # exceptions that are not user errors (none today)


def error_classes():
    for info in pkgutil.walk_packages(mtcpeft.__path__, "mtcpeft."):
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, Exception) and cls is not MtcpeftError:
                yield f"{module.__name__}.{name}", cls


def test_every_error_class_is_a_user_error_that_keeps_its_builtin_base():
    found = dict(error_classes())
    assert len(found) >= 15
    stray = sorted(n for n, c in found.items() if not issubclass(c, MtcpeftError)
                   and n.rpartition(".")[2] not in NOT_USER_ERRORS)
    assert not stray, f"derive these from mtcpeft.errors.MtcpeftError: {stray}"
    assert issubclass(found["mtcpeft.registry.UnknownNameError"], KeyError)  # callers' except clauses still work
    assert issubclass(found["mtcpeft.models.lm.LMNotFoundError"], OSError)


def test_run_cli_prints_a_user_error_as_one_line_and_lets_bugs_through(capsys):
    def user_mistake():
        raise ConfigError("config key 'train.lrr' is unknown; did you mean 'train.lr'?")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(user_mistake)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: config key 'train.lrr' is unknown; did you mean 'train.lr'?\n"

    def bug():
        raise ZeroDivisionError("a bug keeps its traceback")

    with pytest.raises(ZeroDivisionError):
        run_cli(bug)


def test_run_cli_ends_ctrl_c_with_status_130_and_no_traceback(capsys):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_cli(interrupted)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"
