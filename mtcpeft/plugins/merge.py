"""The merger: task plugins -> ONE unified plugin whose context groups serve every source task and new ones.

Multi-task composition as in Context-PEFT (arXiv 2312.08900, Figure 7): adaptors trained per task (caption:
image, text; QA: question, answer) are assembled into one model; downstream tasks route their contexts to
existing groups (VQA: image -> caption.image, question -> qa.question, answer -> qa.answer), so one batch can
mix tasks with no adapter switching (each token picks its group).

* Every source group is kept, namespaced by its task (``caption.image``), stacked along the context dim in
  source order; then come the NEW groups of routes that name several groups (``vqa.question=qa.question+
  caption.text``), built by the strategy:

  - ``keep``: a route must name exactly one group (exact: no new group);
  - ``average``, ``ties`` (TIES-merging, Yadav et al., 2023, arXiv 2306.01708, with ``density``), ``concat``:
    how several groups combine into one is the adaptor kind's own (``AdaptorConfig.combine`` in
    :mod:`mtcpeft.core.adaptors`; each kind's ``strategies`` says what a strategy does to its groups and which
    it supports).

* The kind also decides the merged plugin's options (``AdaptorConfig.merged``, e.g. the largest rank any group
  needs), how a source group is stored under them, exactly (``conform``, e.g. rank padding and scale folding),
  and the group that changes nothing (``identity_group``), given to targets a source lacks (allowed when its
  targets are a subset of another's). Only the tensor names the kind declares are touched.
* Plugins of different adaptor kinds (caption LoRA + QA IA3 + a BitFit plugin) merge into a mixed-kind plugin
  (:mod:`mtcpeft.core.adaptors.mixed`): every group keeps its kind, each kind's groups merge among themselves as
  above, each kind keeps its own targets, and the manifest's adaptor records the kind of each group.
* Refused: plugins of different base LMs (fingerprint), fully fine-tuned LMs, a strategy the kind does not define,
  a new group combining groups of different kinds, target sets of one kind that are not nested, different widths,
  and two different projectors unless ``projector`` picks one.

The manifest adds ``routes`` {task: {task context: group}} (each source task routes to its own groups),
``generated`` {task: group of generated tokens}, ``merge`` {strategy, density, new_groups, exact} and
``sources`` [{task, source_task, dir, fingerprint, contexts, adaptor, layout}]. :func:`route_table` gives the
per-token context id remapping of a task; :func:`apply_plugin` copies a plugin's groups into a ContextModel by
context name (:func:`mtcpeft.plugins.load.load_model` loads any plugin as a model).
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from mtcpeft.core.adaptors import ADAPTORS, AdaptorConfig, GroupMergeError, compose_kinds
from mtcpeft.core.model import ContextModel
from .manifest import AdaptorInfo, Manifest, MergeInfo, PluginError, SourceInfo, load_plugin, save_plugin

STRATEGIES = ("keep", "average", "ties", "concat")
PROJECTOR_PREFIX = "projector."
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


class MergeError(PluginError):
    """Plugins or routes that cannot be merged as asked; the message names the conflict and the fix."""


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Route:
    """``task.context`` of a downstream task served by one group, or by several merged into a new group."""

    task: str
    context: str
    groups: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.task}.{self.context}"


def parse_route(text: str) -> Route:
    """``"vqa.question=qa.question+caption.text"`` -> Route("vqa", "question", ("qa.question", "caption.text"))."""
    form = "routes read TASK.CONTEXT=SOURCE.CONTEXT[+SOURCE.CONTEXT...], e.g. vqa.image=caption.image"
    lhs, sep, rhs = (s.strip() for s in text.partition("="))
    task, dot, ctx = lhs.partition(".")
    if not sep or not rhs or not dot or not _NAME.fullmatch(task) or not ctx:
        raise MergeError(f"bad route {text!r}: {form}")
    groups = tuple(g.strip() for g in rhs.split("+"))
    if not all(groups):
        raise MergeError(f"bad route {text!r}: an empty group name around '+'; {form}")
    if len(set(groups)) != len(groups):
        raise MergeError(f"route {text!r} names a group twice")
    return Route(task, ctx, groups)


@dataclass
class Source:
    """One plugin to merge; ``name`` namespaces its contexts (default: its task)."""

    name: str
    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    path: str = ""

    @property
    def merged(self) -> bool:  # an earlier merge: its contexts are namespaced already
        return self.manifest.unified

    def group(self, context: str) -> str:
        return context if self.merged else f"{self.name}.{context}"

    @property
    def groups(self) -> list[str]:
        return [self.group(c) for c in self.manifest.contexts]

    @property
    def kind(self) -> str:
        return self.manifest.adaptor.kind

    @property
    def config(self) -> AdaptorConfig:
        return self.manifest.adaptor.config()

    def parts(self) -> list["Source"]:
        """Single-kind views of this plugin: itself, or for a plugin of several kinds one per kind (its groups of
        that kind, stacked, under the names of the modules they adapt), named and routed as the plugin."""
        if self.manifest.adaptor.full_finetune:
            return [self]
        pieces = self.config.split(self.manifest.contexts, self.manifest.targets)
        if len(pieces) == 1:
            return [self]
        prefix, out = self.manifest.prefix, []
        for config, contexts, targets in pieces:
            # a layer of a kind stacks that kind's groups only: its tensors are the part's as they are
            tensors = {f"{prefix}{module}.{p}": self.tensors[f"{prefix}{t}.{p}"]
                       for t, module in targets for p in config.param_names()}
            manifest = replace(self.manifest, contexts=contexts, adaptor=AdaptorInfo.of(config),
                               targets=[module for _, module in targets], tensors={},
                               placement=self.config.member_targets(config, self.manifest.placement))
            out.append(Source(self.name, manifest, tensors, self.path))
        return out


def parse_plugin_arg(text: str) -> tuple[str | None, str]:
    """``"caption=runs/caption/plugin"`` -> ("caption", path); a bare path -> (None, path)."""
    name, sep, path = text.partition("=")
    return (name, path) if sep and _NAME.fullmatch(name) else (None, text)


def load_sources(plugins: Sequence[str | os.PathLike | tuple[str | None, str | os.PathLike]]) -> list[Source]:
    """Load ``["caption=DIR", ("qa", DIR), DIR, ...]``; unnamed plugins take their manifest's task as name."""
    out = []
    for item in plugins:
        if isinstance(item, tuple):
            name, path = item
        else:
            name, path = parse_plugin_arg(str(item))
        manifest, tensors = load_plugin(path)
        out.append(Source(name or manifest.task, manifest, tensors, str(path)))
    return out


def task_routes(manifest: Manifest) -> dict[str, dict[str, str]]:
    """{task: {task context: group}}: a merged plugin's routes, or an ordinary plugin's own task (a
    context-agnostic plugin routes every task context to its one group)."""
    if manifest.routes is not None:
        return manifest.routes
    contexts = manifest.contexts
    table = {}
    for c in manifest.task_contexts or contexts:
        if c not in contexts and len(contexts) != 1:
            raise MergeError(f"task context {c!r} of {manifest.task!r} has no group among {contexts}")
        table[c] = c if c in contexts else contexts[0]
    return {manifest.task: table}


# ------------------------------------------------------------------------------------------- the plan
def _mergeable() -> list[str]:
    """Kinds with per-context tensors: what a merge can combine."""
    return [k for k in ADAPTORS if ADAPTORS.get(k).param_names()]


def _check_sources(sources: list[Source], strategy: str, density: float) -> dict[str, list[str]]:
    """Refuse what cannot be combined; return the merged targets of each kind (its largest set, in model order)."""
    if not sources:
        raise MergeError("nothing to merge: pass at least one plugin")
    names = [s.name for s in sources]
    bad = [n for n in names if not _NAME.fullmatch(n)]
    if bad:
        raise MergeError(f"plugin name {bad[0]!r} must be a word (letters, digits, _ or -): it prefixes contexts")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MergeError(f"two plugins are named {dup[0]!r}; name them apart with --plugin NAME=DIR")
    first = sources[0]
    for s in sources:
        where = f"plugin {s.name!r} ({s.path or 'in memory'})"
        if s.manifest.base_lm_fingerprint != first.manifest.base_lm_fingerprint:
            raise MergeError(
                f"{where} was trained on another base LM than {first.name!r}: fingerprints "
                f"{s.manifest.base_lm_fingerprint} ({s.manifest.base_lm!r}) vs "
                f"{first.manifest.base_lm_fingerprint} ({first.manifest.base_lm!r}); merge plugins of one base")
        if s.manifest.adaptor.full_finetune:
            raise MergeError(f"{where} fine-tunes the whole LM: only adaptor plugins ({', '.join(_mergeable())}) "
                             "merge")
        if s.kind not in _mergeable() and not ADAPTORS.get(s.kind).composite:
            raise MergeError(f"{where} holds no adaptor groups (kind {s.kind!r}); only adaptor plugins "
                             f"({', '.join(_mergeable())}) merge")
    if strategy not in STRATEGIES:
        raise MergeError(f"unknown strategy {strategy!r}; strategies: {', '.join(STRATEGIES)}")
    sources = [part for s in sources for part in s.parts()]  # a plugin of several kinds: one part per kind
    kinds = list(dict.fromkeys(s.kind for s in sources))
    problem = ADAPTORS.get(first.kind).strategy_problem(strategy)
    if problem and len(kinds) == 1:
        raise MergeError(problem)
    if strategy == "ties" and not 0.0 < density <= 1.0:
        raise MergeError(f"TIES density must be in (0, 1], got {density}")
    targets = {}
    for kind in kinds:  # each kind keeps its own targets (IA3 acts on other modules than LoRA)
        of_kind = [s for s in sources if s.kind == kind]
        widest = max(of_kind, key=lambda s: len(s.manifest.targets))
        for s in of_kind:
            extra = [t for t in s.manifest.targets if t not in widest.manifest.targets]
            if extra:
                raise MergeError(f"plugins {widest.name!r} and {s.name!r} adapt different layers (e.g. {extra[0]!r} "
                                 f"only in {s.name!r}); merging needs one's targets within the other's: train with "
                                 "the same adaptor.targets")
        targets[kind] = list(widest.manifest.targets)
    return targets


@dataclass
class _Plan:
    groups: list[str]  # unified contexts: source groups, then new groups
    owner: dict[str, tuple[Source, int]]  # source group -> (source, its context index)
    new: dict[str, tuple[str, ...]]  # new group -> member source groups
    routes: dict[str, dict[str, str]]
    generated: dict[str, str]


def _unknown_group(group: str, route: Route, sources: list[Source]) -> MergeError:
    task, _, ctx = group.partition(".")
    by_task = {}
    for s in sources:
        for g in s.groups:
            t, _, c = g.partition(".")
            by_task.setdefault(t, []).append(c)
    text = f"{route.name}={'+'.join(route.groups)}"
    if task not in by_task:
        return MergeError(f"unknown task {task!r} in route {text!r}; source tasks: {', '.join(by_task)}")
    return MergeError(f"unknown context {ctx!r} of task {task!r} in route {text!r}; its contexts: "
                      f"{', '.join(by_task[task])}")


def _plan(sources: list[Source], routes: Sequence[Route], strategy: str, generated: Sequence[str]) -> _Plan:
    owner, table, gen = {}, {}, {}
    for s in sources:
        for i, g in enumerate(s.groups):
            if g in owner:
                raise MergeError(f"context {g!r} comes from two plugins ({owner[g][0].name!r}, {s.name!r})")
            owner[g] = (s, i)
        for task, ctxs in task_routes(s.manifest).items():
            name = task if s.merged else s.name
            if name in table:
                raise MergeError(f"task {name!r} is routed by two plugins; name them apart with --plugin NAME=DIR")
            table[name] = {c: s.group(g) for c, g in ctxs.items()}
        if s.merged:
            gen.update(s.manifest.generated or {})
        elif s.manifest.generated_context is not None:
            gen[s.name] = s.group(s.manifest.generated_context)
    sourced = set(table)
    groups, new = list(owner), {}
    for r in routes:
        if r.task in sourced:
            raise MergeError(f"route {r.name}: {r.task!r} is a source task whose contexts route to its own groups; "
                             "give the downstream task another name")
        for g in r.groups:
            if g not in owner:
                raise _unknown_group(g, r, sources)
        if r.context in table.get(r.task, {}):
            raise MergeError(f"{r.name} is routed twice")
        if len(r.groups) == 1:
            table.setdefault(r.task, {})[r.context] = r.groups[0]
            continue
        if strategy == "keep":
            raise MergeError(f"route {r.name}={'+'.join(r.groups)} names {len(r.groups)} groups but strategy 'keep' "
                             "needs exactly one; pick --strategy average, ties or concat to merge them")
        new[r.name] = r.groups
        groups.append(r.name)
        table.setdefault(r.task, {})[r.context] = r.name
    for text in generated:
        task, _, ctx = text.partition(".")
        if ctx not in table.get(task, {}):
            raise MergeError(f"generated context {text!r} is not routed; routed: "
                             f"{', '.join(f'{t}.{c}' for t, cs in table.items() for c in cs)}")
        gen[task] = table[task][ctx]
    return _Plan(groups, owner, new, table, gen)


# ------------------------------------------------------------------------------------------- strategies
# How groups combine is the adaptor kind's (mtcpeft.core.adaptors: AdaptorConfig.merged / conform / combine /
# identity_group); this part only gathers each target's groups, in plan order, and stacks them.
@contextmanager
def _as_merge_error():
    """A kind's refusal (:class:`GroupMergeError`) surfaces as this module's :class:`MergeError`."""
    try:
        yield
    except GroupMergeError as e:
        raise MergeError(str(e)) from None


def _merge_adaptors(sources, plan, targets, strategy, density) -> tuple[AdaptorInfo, dict]:
    """(manifest "adaptor" entry, stacked tensors) of the unified plugin: per target, every planned group under the
    merged config — a source's own group conformed to it, an identity group where the source lacks the target, a
    new group combined from its members — stacked in plan order."""
    kind = ADAPTORS.get(sources[0].kind)
    params = kind.param_names()
    prefix = sources[0].manifest.prefix
    configs = {s.name: s.config for s in sources}
    merged = kind.merged([configs[s.name] for s in sources],
                         [[configs[plan.owner[g][0].name] for g in members] for members in plan.new.values()], strategy)
    out = {}
    for t in targets:
        holders = [s for s in sources if t in s.manifest.targets]
        shapes = [holders[0].tensors[f"{holders[0].manifest.prefix}{t}.{p}"].shape for p in params]
        dtype = holders[0].tensors[f"{holders[0].manifest.prefix}{t}.{params[0]}"].dtype
        for s in holders:
            own = [s.tensors[f"{s.manifest.prefix}{t}.{p}"].shape for p in params]
            if [o[-1] for o in own] != [x[-1] for x in shapes]:  # d_in / d_out / scaled width
                raise MergeError(f"target {t!r} has tensors {[list(o) for o in own]} in {s.name!r} but "
                                 f"{[list(x) for x in shapes]} in {holders[0].name!r}: different widths or placements")
        saved = {}  # group -> (its tensors, the config they were saved under)
        for g, (s, i) in plan.owner.items():
            if t in s.manifest.targets:
                saved[g] = ([s.tensors[f"{s.manifest.prefix}{t}.{p}"][i] for p in params], configs[s.name])
            else:  # a target this source lacks: a group that changes nothing
                saved[g] = (merged.identity_group([x[1:] for x in shapes], f"{t}/{g}"), merged)
        with _as_merge_error():
            groups = {g: merged.conform(ts, config) for g, (ts, config) in saved.items()}
            for g, members in plan.new.items():
                groups[g] = merged.combine([saved[m] for m in members], strategy, density)
        for j, p in enumerate(params):
            out[f"{prefix}{t}.{p}"] = torch.stack([groups[g][j].to(dtype) for g in plan.groups]).contiguous()
    return AdaptorInfo.of(merged), out


def _merge_kinds(sources, plan, targets, strategy, density) -> tuple[AdaptorInfo, dict, list[str]]:
    """Plugins of several kinds: every group keeps its kind. Each kind's groups merge among themselves exactly as in
    a one-kind merge (its own targets, options and strategies: :func:`_merge_adaptors` on that kind's part of the
    plan), and the unified adaptor is the kinds' composition (:func:`~mtcpeft.core.adaptors.compose_kinds`), whose
    layer at a module holds one context layer per kind acting there. Returns (adaptor entry, tensors, targets)."""
    owner = {}  # group -> (the single-kind part of its plugin holding it, its index there)
    for s in sources:
        for part in s.parts():
            for i, c in enumerate(part.manifest.contexts):
                owner[s.group(c)] = (part, i)
    plan = _Plan(plan.groups, owner, plan.new, plan.routes, plan.generated)
    kind_of = {g: s.kind for g, (s, _) in plan.owner.items()}
    for g, members in plan.new.items():
        kinds = list(dict.fromkeys(kind_of[m] for m in members))
        if len(kinds) > 1:
            (a, (sa, _)), (b, (sb, _)) = [next((m, plan.owner[m]) for m in members if kind_of[m] == k)
                                          for k in kinds[:2]]
            raise MergeError(f"cannot merge a {kinds[0]} plugin ({sa.name!r}) with a {kinds[1]} plugin ({sb.name!r}) "
                             f"into one group {g!r} ({a} + {b}): groups of different kinds are different functions "
                             "that no strategy combines into one; route it to one group, or to groups of one kind")
        kind_of[g] = kinds[0]
    configs, parts, owners = {}, {}, []
    for kind in dict.fromkeys(kind_of[g] for g in plan.groups):
        part = _Plan([g for g in plan.groups if kind_of[g] == kind],
                     {g: o for g, o in plan.owner.items() if kind_of[g] == kind},
                     {g: m for g, m in plan.new.items() if kind_of[g] == kind}, plan.routes, plan.generated)
        problem = ADAPTORS.get(kind).strategy_problem(strategy)
        if problem and part.new:
            raise MergeError(problem)
        of_kind = [p for s in sources for p in s.parts() if p.kind == kind]
        info, tensors = _merge_adaptors(of_kind, part, targets[kind], strategy, density)
        owners.append(max(of_kind, key=lambda s: len(s.manifest.targets)))
        configs[kind], parts[kind] = info.config(), (of_kind[0].manifest.prefix, tensors)
    placements = {p.kind: p.manifest.placement for p in owners}  # each kind's (widest) placement
    placement = max(sources, key=lambda s: len(s.manifest.targets)).manifest.placement
    mixed = compose_kinds([kind_of[g] for g in plan.groups], configs,
                          {k: p for k, p in placements.items() if p != placement})
    prefix, out, names = sources[0].manifest.prefix, {}, []
    for kind, (own_prefix, tensors) in parts.items():
        names += [mixed.target(t, kind) for t in targets[kind]]
        for key, value in tensors.items():
            module, _, param = key[len(own_prefix):].rpartition(".")
            out[f"{prefix}{mixed.target(module, kind)}.{param}"] = value
    return AdaptorInfo.of(mixed), out, names


def _projector(sources: list[Source], pick: str | None) -> Source | None:
    """The one plugin whose projector (and vision encoder) the merged plugin keeps."""
    holders = [s for s in sources if any(k.startswith(PROJECTOR_PREFIX) for k in s.tensors)]
    if pick is not None:
        chosen = [s for s in sources if s.name == pick]
        if not chosen:
            raise MergeError(f"--projector {pick!r} names no plugin; plugins: {', '.join(s.name for s in sources)}")
        if chosen[0] not in holders:
            raise MergeError(f"--projector {pick!r}: that plugin has no projector; plugins with one: "
                             f"{', '.join(s.name for s in holders) or '(none)'}")
        return chosen[0]
    if not holders:
        return None
    first = holders[0]
    mine = {k: v for k, v in first.tensors.items() if k.startswith(PROJECTOR_PREFIX)}
    for s in holders[1:]:
        theirs = {k: v for k, v in s.tensors.items() if k.startswith(PROJECTOR_PREFIX)}
        if theirs.keys() != mine.keys() or not all(torch.equal(theirs[k], mine[k]) for k in mine):
            raise MergeError(f"plugins {first.name!r} and {s.name!r} carry different projectors; keep one with "
                             f"--projector {first.name} (or {s.name})")
    return first


# ------------------------------------------------------------------------------------------------ merge
def merge_plugins(sources: Sequence[Source], routes: Sequence[Route | str] = (), strategy: str = "keep", *,
                  projector: str | None = None, task: str = "unified", density: float = 0.2,
                  generated: Sequence[str] = ()) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """(manifest, tensors) of the unified plugin; see the module docstring for what each option does."""
    sources = list(sources)
    routes = [parse_route(r) if isinstance(r, str) else r for r in routes]
    targets = _check_sources(sources, strategy, density)
    for s in sources:
        stray = [k for k in s.tensors if not k.startswith((PROJECTOR_PREFIX, s.manifest.prefix))]
        if stray:
            raise MergeError(f"plugin {s.name!r} holds {stray[0]!r}, neither an adaptor nor a projector tensor")
    plan = _plan(sources, routes, strategy, generated)
    if all(len(s.parts()) == 1 for s in sources) and len(targets) == 1:
        (kind_targets,) = targets.values()
        adaptor, tensors = _merge_adaptors(sources, plan, kind_targets, strategy, density)
        merged_targets = kind_targets
    else:
        adaptor, tensors, merged_targets = _merge_kinds(sources, plan, targets, strategy, density)
    proj = _projector(sources, projector)
    if proj is not None:
        tensors.update({k: v for k, v in proj.tensors.items() if k.startswith(PROJECTOR_PREFIX)})
    widest = max(sources, key=lambda s: len(s.manifest.targets))
    first = sources[0].manifest
    manifest = Manifest(
        task=task,
        contexts=plan.groups,
        generated_context=None,
        adaptor=adaptor,
        placement=widest.manifest.placement,
        targets=merged_targets,
        base_lm=first.base_lm,
        base_lm_fingerprint=first.base_lm_fingerprint,
        vision=proj.manifest.vision if proj else None,
        projector=proj.manifest.projector if proj else None,
        adaptor_prefix=first.adaptor_prefix,
        routes=plan.routes,
        generated=plan.generated,
        merge=MergeInfo(strategy=strategy, density=density if strategy == "ties" else None,
                        new_groups={g: list(m) for g, m in plan.new.items()},
                        exact=not plan.new or strategy == "concat", projector_from=proj.name if proj else None),
        sources=[SourceInfo(task=s.name, source_task=s.manifest.task, dir=s.path,
                            fingerprint=s.manifest.base_lm_fingerprint, contexts=s.manifest.contexts,
                            adaptor=s.manifest.adaptor, layout=s.manifest.layout) for s in sources],
    )
    return manifest, tensors


def check_not_a_source(out_dir: str | os.PathLike, plugins: Sequence) -> None:
    """Refuse an output directory that is one of the plugins being merged (it would be overwritten)."""
    for item in plugins:
        name, path = item if isinstance(item, tuple) else parse_plugin_arg(str(item))
        if Path(path).resolve() == Path(out_dir).resolve():
            raise MergeError(f"the output {out_dir} is the source plugin {name or path}; write the merge to another "
                             "directory")


def merge_to_dir(out_dir: str | os.PathLike, plugins: Sequence, routes: Sequence[Route | str] = (),
                 strategy: str = "keep", **options) -> tuple[Path, Manifest]:
    """Load ``plugins`` (see :func:`load_sources`), merge them and save the unified plugin atomically; never
    over one of the sources (its manifest would list itself as its own source)."""
    check_not_a_source(out_dir, plugins)
    manifest, tensors = merge_plugins(load_sources(plugins), routes, strategy, **options)
    return save_plugin(out_dir, manifest, tensors), manifest


# ------------------------------------------------------------------------------------------------ using
def route_table(manifest: Manifest, task: str, contexts: Sequence[str] | None = None) -> list[int]:
    """The plugin group id of each of ``task``'s contexts (``contexts``: the task's own order; default the order
    of the routing table). Remap a dataset's per-token ids with ``torch.tensor(table)[ids]`` (keep -1 as -1),
    or use :func:`route_map`."""
    table = task_route(manifest, task)
    order = list(table) if contexts is None else list(contexts)
    unknown = [c for c in order if c not in table]
    if unknown:
        raise MergeError(f"task {task!r} has no route for context {unknown[0]!r}; routed: {', '.join(table)}")
    return [manifest.contexts.index(table[c]) for c in order]


def route_map(manifest: Manifest, task: str, contexts: Sequence[str] | None = None) -> torch.Tensor:
    """(C_task + 1,) long lookup: ``route_map(...)[ids + 1]`` maps a task's context ids to group ids, -1 to -1
    (the form :class:`mtcpeft.data.dataset.EncodedDataset` takes as ``context_map``)."""
    return torch.tensor([-1, *route_table(manifest, task, contexts)], dtype=torch.long)


def generated_group(manifest: Manifest, task) -> str:
    """The plugin group of a task's generated tokens: its route of ``task.generated_context``."""
    return task_route(manifest, task.name)[task.generated_context]


def task_route(manifest: Manifest, task: str) -> dict[str, str]:
    """{task context: plugin group} of ``task`` (see :func:`task_routes`); an unrouted task is refused."""
    routes = task_routes(manifest)
    if task not in routes:
        raise MergeError(f"the plugin routes no task {task!r}; routed tasks: {', '.join(routes)}")
    return routes[task]


def apply_plugin(model: ContextModel, manifest: Manifest, tensors: dict[str, torch.Tensor], prefix: str | None = None,
                 mapping: dict[str, str] | None = None) -> dict[str, str]:
    """Copy a plugin's groups into ``model`` by context name; returns {plugin context: model context}.

    A plugin context ``c`` of task ``t`` goes to ``mapping[c]``, else to the model's context ``c``, else to
    ``t.c`` (so a task plugin fills its namespaced groups of a unified model, whatever kinds the model mixes: each
    group goes to the model's layer of its kind at the same module). Each group is stored as the model's
    adaptor config holds it (:meth:`~mtcpeft.core.adaptors.AdaptorConfig.conform`: e.g. a smaller rank
    zero-padded, another scale folded into B; exact). Model groups and targets the plugin does not name are left
    as they are.
    """
    full = manifest.adaptor.full_finetune
    saved_as = manifest.adaptor.config()
    # per kind: the model's layer at each module and the model contexts that kind's layers stack
    own_layers = {}
    for config, contexts, targets in model.adaptor.split(model.vocab.names, model.target_names):
        own_layers.update({(config.name, module): (layer, config, contexts) for layer, module in targets})
    model_kinds = sorted({k for k, _ in own_layers})
    if full or any(config.name not in model_kinds for config in saved_as.members()):
        holds = "a fully fine-tuned LM" if full else manifest.adaptor.kind + " adaptors"
        raise MergeError(f"the plugin holds {holds}; the model has {model.adaptor.name} adaptors")
    prefix = manifest.prefix if prefix is None else prefix
    mapping = mapping or {}
    where = {}
    for c in manifest.contexts:
        for name in (mapping.get(c), c, f"{manifest.task}.{c}"):
            if name is not None and name in model.vocab:
                where[c] = name
                break
        else:
            raise MergeError(f"the model has no context for the plugin's {c!r} (tried {c!r} and "
                             f"{manifest.task}.{c!r}); its contexts: {list(model.vocab.names)}; pass mapping=")
    layers = dict(model.context_layers())
    with torch.no_grad(), _as_merge_error():
        for source, contexts, targets in saved_as.split(manifest.contexts, manifest.targets):
            for t, module in targets:
                if (source.name, module) not in own_layers:
                    raise MergeError(f"the plugin adapts {t!r}, which the model does not; build it with the plugin's "
                                     f"placement {manifest.placement!r}")
                layer, own_config, stacked = own_layers[(source.name, module)]
                problem = own_config.fit_problem(source)
                if problem:
                    raise MergeError(f"the plugin does not fit the model: {problem}")
                params = source.param_names()
                own = [getattr(layers[layer], p) for p in params]
                src = [tensors[f"{prefix}{t}.{p}"] for p in params]
                for p, o, x in zip(params, own, src):
                    if x.shape[-1] != o.shape[-1] or x.shape[2:-1] != o.shape[2:-1]:
                        raise MergeError(f"{t}.{p}: plugin shape {list(x.shape)} does not fit the model's "
                                         f"{list(o.shape)} (another base LM or placement?)")
                for i, c in enumerate(contexts):
                    if where[c] not in stacked:
                        raise MergeError(f"the plugin's {c!r} is a {source.name} group but the model's {where[c]!r} "
                                         "is of another kind; build the model with the plugin's kind of each group")
                    group = own_config.conform([x[i] for x in src], source)  # e.g. rank padding, scale folding
                    for o, row in zip(own, group):
                        o[stacked.index(where[c])].copy_(row)
    return where


def projector_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The projector's state dict inside plugin tensors (``projector.<name>`` -> ``<name>``)."""
    return {k[len(PROJECTOR_PREFIX):]: v for k, v in tensors.items() if k.startswith(PROJECTOR_PREFIX)}
