"""The package is layered as the data flows: each folder imports only from the folders below it, and the library
never imports the top-level ``tasks`` package (tasks import the library and are handed to it)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mtcpeft"
# bottom to top; below them all the utilities (errors, io, registry), which import no layer
LAYERS = ["core", "models", "data", "plugins", "training", "evaluation", "experiments"]
UTILITIES = {"errors", "io", "registry"}


def imports(path: Path) -> list[str]:
    """Absolute names of the mtcpeft / tasks modules a file imports (relative imports resolved)."""
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            out.append(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return [m for m in out if m.split(".")[0] in ("mtcpeft", "tasks")]


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_module_of_the_library_imports_tasks():
    bad = [f"{p.relative_to(PKG.parent)}: {m}" for p in PKG.rglob("*.py") for m in imports(p) if m.startswith("tasks")]
    assert not bad, bad


def test_each_layer_imports_only_layers_below_it():
    bad = []
    for path in PKG.rglob("*.py"):
        own = layer_of("mtcpeft." + ".".join(path.relative_to(PKG).with_suffix("").parts))
        if own is None:  # the package root: utilities import no layer (config, cli and __init__ may)
            if path.stem in UTILITIES:
                bad += [f"{path.name} (utility) imports {m}" for m in imports(path) if layer_of(m) is not None]
            continue
        for m in imports(path):
            other = layer_of(m)
            if other is not None and LAYERS.index(other) > LAYERS.index(own):
                bad.append(f"{path.relative_to(PKG.parent)} ({own}) imports {m} ({other})")
    assert not bad, "\n".join(bad)
