"""Merge task plugins into ONE unified plugin, with routes for downstream tasks (Context-PEFT, Figure 7).

    python launch/merge.py --plugin caption=runs/caption_offline/plugin --plugin qa=runs/qa_offline/plugin \\
        --route vqa.image=caption.image --route vqa.question=qa.question --route vqa.answer=qa.answer \\
        --generated vqa.answer --out runs/unified/plugin
    python launch/merge.py --spec configs/merge_vqa.yaml                       # the same, from a YAML file
    python launch/merge.py --plugin caption=DIR --plugin qa=DIR --route vqa.question=qa.question+caption.text \\
        --strategy concat --out DIR                                             # a new group: the exact sum

Every group of every plugin is kept, namespaced by its plugin's name (``caption.image``); each source task
routes to its own groups, ``--route`` adds downstream tasks. A route naming several groups (``a.x+b.y``)
builds a new group with ``--strategy`` average | ties (``--density``) | concat (LoRA, exact); ``keep`` (the
default) allows one group per route. ``--projector TASK`` picks the projector when two plugins carry
different ones. A YAML spec holds the same keys (plugins: {name: dir}, routes: {task.context: groups} or a
list of "task.context=groups", strategy, density, projector, generated, task, out); command-line flags add to
or override it. The unified plugin is written atomically; see mtcpeft/plugins/merge.py for the manifest. An existing
--out is replaced only if it holds a plugin and --overwrite is given, never if it is one of the sources or
holds other files.
"""
from __future__ import annotations

if __name__ == "__main__":
    import _require_mtcpeft  # noqa: F401  (one `error:` line if mtcpeft is not installed)

import argparse
from pathlib import Path

import yaml

from mtcpeft.cli import run_cli
from mtcpeft.io import check_output_dir
from mtcpeft.plugins.manifest import MANIFEST, TENSORS, Manifest
from mtcpeft.plugins.merge import STRATEGIES, MergeError, check_not_a_source, merge_to_dir

SPEC_KEYS = ("plugins", "routes", "strategy", "density", "projector", "generated", "task", "out")


def read_spec(path: str) -> dict:
    """A YAML merge spec as flat lists: plugins ["name=dir"], routes ["task.ctx=groups"], the rest as given."""
    try:
        spec = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise MergeError(f"cannot read the merge spec {path}: {e}") from None
    if not isinstance(spec, dict):
        raise MergeError(f"the merge spec {path} must be a mapping with keys {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise MergeError(f"unknown key {unknown[0]!r} in the merge spec {path}; keys: {', '.join(SPEC_KEYS)}")
    out = dict(spec)
    plugins = spec.get("plugins") or []
    out["plugins"] = [f"{k}={v}" for k, v in plugins.items()] if isinstance(plugins, dict) else list(plugins)
    routes = spec.get("routes") or []
    out["routes"] = [f"{k}={v}" for k, v in routes.items()] if isinstance(routes, dict) else list(routes)
    gen = spec.get("generated") or []
    out["generated"] = [gen] if isinstance(gen, str) else list(gen)
    return out


def with_overrides(spec_plugins: list[str], cli_plugins: list[str]) -> list[str]:
    """The spec's plugins, with each named on the command line (``--plugin NAME=DIR``) replaced by that entry."""
    named = {p.split("=", 1)[0] for p in cli_plugins if "=" in p}
    return [p for p in spec_plugins if p.split("=", 1)[0] not in named] + cli_plugins


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plugin", action="append", default=[], metavar="NAME=DIR",
                    help="a plugin directory, named (NAME=DIR) or taking its task as name; repeat; replaces the "
                         "--spec's plugin of the same NAME")
    ap.add_argument("--route", action="append", default=[], metavar="TASK.CTX=SRC.CTX[+SRC.CTX]",
                    help="route a downstream task's context to a group (or several, merged); repeat")
    ap.add_argument("--spec", help="YAML file with the same keys (plugins, routes, strategy, ...)")
    ap.add_argument("--strategy", choices=STRATEGIES, help="how a route of several groups becomes one (default keep)")
    ap.add_argument("--density", type=float, help="ties: fraction of each task vector kept (default 0.2)")
    ap.add_argument("--projector", metavar="NAME", help="the plugin whose projector to keep when they differ")
    ap.add_argument("--generated", action="append", default=[], metavar="TASK.CTX",
                    help="the context of generated tokens of a downstream task; repeat")
    ap.add_argument("--task", help="name of the unified plugin (default 'unified')")
    ap.add_argument("--out", help="output plugin directory")
    ap.add_argument("--overwrite", action="store_true", help="replace the plugin already in --out")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> Manifest:
    args = parse_args(argv)
    spec = read_spec(args.spec) if args.spec else {}
    plugins = with_overrides(spec.get("plugins", []), args.plugin)
    routes = spec.get("routes", []) + args.route
    out = args.out or spec.get("out")
    if not plugins or not out:
        raise MergeError("pass the plugins (--plugin NAME=DIR, repeated) and --out DIR, or a --spec that has them")
    options = {
        "strategy": args.strategy or spec.get("strategy", "keep"),
        "projector": args.projector or spec.get("projector"),
        "task": args.task or spec.get("task", "unified"),
        "density": args.density if args.density is not None else spec.get("density", 0.2),
        "generated": spec.get("generated", []) + args.generated,
    }
    check_not_a_source(out, plugins)  # before any plugin is loaded, and even with --overwrite
    check_output_dir(out, (MANIFEST, TENSORS), overwrite=args.overwrite, what="plugin")
    path, manifest = merge_to_dir(out, plugins, routes, **options)
    print(f"unified plugin: {path}")
    options = manifest.adaptor.options
    print(f"contexts: {', '.join(manifest.contexts)}  ({manifest.adaptor.kind}"
          f"{', rank %d' % options['rank'] if 'rank' in options else ''})")
    for task, table in manifest.routes.items():
        print(f"route {task}: " + ", ".join(f"{c} -> {g}" for c, g in table.items()))
    return manifest


if __name__ == "__main__":
    run_cli(main)
