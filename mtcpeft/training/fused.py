"""Fused per-task training: K tasks' adaptor groups trained in ONE process (or one DDP group) on one frozen backbone.

Design. Each task keeps the very model ``train_task.py`` builds for it (:func:`build_task_model`: its own
:class:`~mtcpeft.core.model.ContextModel`, adaptor kind, placement, projector), but every task's LM is a
*structural copy* of one loaded LM that shares all of its parameter and buffer tensors (:func:`shared_copy`):
injection wraps the copy's projections in place, so K tasks may hold K different adaptor kinds on the same
frozen weights, which are held once. Each task's model is therefore exactly its model trained alone, and so is
its arithmetic: one training step runs every active task's forward on its own batch (each loss the mean NLL over
that task's own label tokens), one backward of the sum (the tasks' trainable tensors are disjoint, so each
receives exactly the gradient of its own loss), then per task its own gradient clipping and its own optimizer
(own learning rate, betas, state). Validation, the best epoch and the plugin are per task, written by
:func:`~mtcpeft.training.build.task_plugin` into the task's own ``output_dir`` as ``train_task.py`` writes them.

Each task walks its own epochs of its own data loader (seeded like a run of its own); a task whose steps are done
sits out the remaining steps of longer ones. The mix: every step holds ``train.batch_size`` examples of each task
(a per-task setting), and ``ratios`` (``--ratio caption=2,qa=1``) let a task take part in only some steps. Under DDP the wrapper tolerates a task that a step does not reach
(``find_unused_parameters``), and a task with no label tokens on any process that step takes no optimizer step.
Under DeepSpeed ZeRO-2/3 the K optimizers are one optimizer with a param group per task, and per-task clipping and
sitting out happen in a step hook on it (:mod:`.fused_zero` explains why and what stays exact).

Exactness needs the same random numbers too: each task's model is initialised with its own seed as alone, and
everything a task does afterwards (fetching its batches, its forward with its dropout masks, its validation) runs
on its own torch random stream (:class:`RngStream`), seeded where a run of its own seeds it; so dropout and
augmentation draw what they would draw alone.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mtcpeft.config import ConfigError, RunConfig, save_config
from mtcpeft.core.losses import IGNORE, perplexity, target_nll
from mtcpeft.io import write_json
from mtcpeft.models.lm import load_lm
from .build import build_task_model, task_plugin
from .fused_checkpoint import keep_trainable, load_fused_checkpoint, save_fused_checkpoint
from .fused_zero import check_zero_groups, gathered_trainable, task_groups
from .progress import error_text, write_progress
from .trainer import DivergenceError, TrainState, make_adamw, zero_stage

SHARED_KEYS = ("model.lm",)  # config keys every fused task must agree on (one backbone)


class FusedConfigError(ConfigError):
    """The tasks' configs cannot train fused (a different backbone, full fine-tuning, gradient accumulation)."""


def shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module``'s structure whose parameters and buffers ARE ``module``'s (no tensor is copied):
    adaptors injected into the copy wrap its own modules while the frozen weights stay held once."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


class RngStream:
    """One task's torch random stream (CPU and every CUDA device), swapped in for what the task does and out after:
    the draws a task makes do not depend on the other tasks of the run."""

    def __init__(self):
        self.state = self._capture()

    @staticmethod
    def _capture():
        return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    @staticmethod
    def _restore(state) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state_all(state[1])

    @contextmanager
    def active(self):
        outer = self._capture()
        self._restore(self.state)
        try:
            yield
        finally:
            self.state = self._capture()
            self._restore(outer)


class FusedModel(nn.Module):
    """K task models (:class:`~mtcpeft.models.vlm.VisionLanguageModel`) on one frozen backbone.

    ``forward(batches)``: {task: batch} -> {task: loss}, each the mean NLL over that task's label tokens; one call
    per step, so one DDP forward/backward covers every task."""

    def __init__(self, models: dict[str, nn.Module]):
        super().__init__()
        self.tasks = nn.ModuleDict(models)
        self.streams: dict[str, RngStream] = {}  # each task's forward runs on its own random stream (if set)

    def forward(self, batches: dict[str, dict]) -> dict[str, torch.Tensor]:
        losses = {}
        for name, batch in batches.items():
            with self.streams[name].active() if name in self.streams else nullcontext():
                losses[name] = self.tasks[name](**batch).loss
        return losses


def check_fused_configs(cfgs: dict[str, RunConfig]) -> None:
    """Refuse what fused training cannot do, naming the task, the key and the fix."""
    first_name, first = next(iter(cfgs.items()))
    for name, cfg in cfgs.items():
        if cfg.model.lm != first.model.lm:
            raise FusedConfigError(f"fused tasks share one frozen LM, but {name} has model.lm={cfg.model.lm} and "
                                   f"{first_name} model.lm={first.model.lm}; set the same model.lm for every task")
        if cfg.train.mode == "full":
            raise FusedConfigError(f"task {name} has train.mode=full: the LM weights are shared by the fused tasks "
                                   "and must stay frozen; train it alone with launch/train_task.py")
        if cfg.train.grad_accum != 1:
            raise FusedConfigError(f"task {name} has train.grad_accum={cfg.train.grad_accum}: fused training does "
                                   "not accumulate gradients yet; set train.grad_accum=1 (a larger batch_size)")
        if cfg.train.mixed_precision != first.train.mixed_precision:
            raise FusedConfigError(f"fused tasks run under one precision, but {name} has train.mixed_precision="
                                   f"{cfg.train.mixed_precision} and {first_name} {first.train.mixed_precision}; "
                                   "set the same train.mixed_precision for every task")
        if cfg.train.resume != first.train.resume:
            raise FusedConfigError(f"a fused run resumes every task or none, but {name} has train.resume="
                                   f"{cfg.train.resume}; set train.resume for every task (a key=value override)")
    outs = [str(Path(c.output_dir).resolve()) for c in cfgs.values()]
    if len(set(outs)) != len(outs):
        raise FusedConfigError(f"fused tasks need distinct output_dir values, got {outs}")


def build_fused_model(cfgs: dict[str, RunConfig], tasks: dict, lm: nn.Module | None = None):
    """(FusedModel, {task: (tokenizer, layout)}): the LM is loaded once; each task's model is built exactly as
    alone (seeded with its own ``seed`` right before, as ``start_run`` seeds a run of its own) on a
    :func:`shared_copy` of it. Image tasks with the same vision config share one encoder."""
    check_fused_configs(cfgs)
    lm = lm if lm is not None else load_lm(next(iter(cfgs.values())).model.lm)
    models, extras, encoders = {}, {}, {}
    for name, cfg in cfgs.items():
        set_seed(cfg.seed)
        model, tok, layout = build_task_model(cfg, tasks[name], lm=shared_copy(lm))
        if model.encoder is not None:  # frozen: one per vision config
            key = (cfg.model.vision, cfg.model.vision_pretrained, cfg.model.image_size)
            model.encoder = encoders.setdefault(key, model.encoder)
        models[name], extras[name] = model, (tok, layout)
    return FusedModel(models), extras


@dataclass
class TaskRun:
    """One task of a fused run: its config, prepared loaders and optimizer, and its progress."""

    name: str
    cfg: RunConfig
    task: object
    train_dl: object
    val_dl: object | None
    opt: object  # its own optimizer; under DeepSpeed the run's one optimizer (its group is this task's)
    params: list
    total_steps: int = 0
    state: TrainState = field(default_factory=TrainState)
    batches: object = None  # the iterator over its batches, across epochs
    rng: RngStream | None = None  # its own random stream
    last_loss: float | None = None  # its latest logged train loss (progress.json)

    def next_batch(self) -> dict:
        with self.rng.active():  # a loader draws its workers' seed from the global stream
            return next(self.batches)

    def walk(self, acc: Accelerator):
        """Its batches epoch after epoch from where its state stands, in the order a run of its own sees them
        (``set_epoch`` per epoch; a resumed epoch skips the batches already trained on)."""
        start, skip = self.state.epoch, self.state.step_in_epoch
        for epoch in range(start, self.cfg.train.epochs):
            self.train_dl.set_epoch(epoch)
            yield from acc.skip_first_batches(self.train_dl, skip) if epoch == start and skip else self.train_dl

    @property
    def done(self) -> bool:
        return self.state.global_step >= self.total_steps


def check_ratios(ratios: dict[str, int], names: list[str]) -> dict[str, int]:
    """{task: weight} for every task (default 1), each a positive integer."""
    unknown = sorted(set(ratios) - set(names))
    bad = {k: v for k, v in ratios.items() if not isinstance(v, int) or v < 1}
    if unknown or bad:
        raise FusedConfigError(f"ratios must give tasks of this run ({names}) positive integer weights, got "
                               f"{ratios}; e.g. caption=2,qa=1")
    return {n: ratios.get(n, 1) for n in names}


def takes_part(weight: int, top: int, step: int) -> bool:
    """Whether a task of ``weight`` trains in fused step ``step`` (0-based) when the heaviest unfinished task weighs
    ``top``: ``weight`` of every ``top`` steps, spread evenly (the heaviest every step). A task's own sequence of
    batches and updates does not change, only when it happens, so the plugin of a task is the same."""
    return (step + 1) * weight // top > step * weight // top


def label_tokens(batch: dict) -> torch.Tensor:
    """How many tokens of ``batch`` carry a loss (labels at position 0 never do: nothing predicts them)."""
    return (batch["labels"][:, 1:] != IGNORE).sum()


class FusedTrainer:
    """The fused loop (see the module docstring). ``data``: {task: (train dataset, val dataset or None)};
    ``collate``: {task: collate function} (default: the default collate)."""

    def __init__(self, cfgs: dict[str, RunConfig], tasks: dict, model: FusedModel, data: dict[str, tuple],
                 acc: Accelerator, collate: dict[str, Callable] | None = None, write_plugins: bool = True,
                 out: str | Path | None = None, ratios: dict[str, int] | None = None):
        """``out``: where the run's checkpoint goes (None: no checkpoints, no resume). ``ratios``: {task: weight},
        how often each task takes part in a step (:func:`takes_part`; default: every task every step)."""
        self.cfgs, self.acc, self.write_plugins, self.out = cfgs, acc, write_plugins, out
        self.ratios = check_ratios(ratios or {}, list(cfgs))
        if acc.mixed_precision == "fp16":  # one loss scaler cannot serve K optimizers that each step it
            raise FusedConfigError("fused training does not run in fp16 yet (one gradient scaler, several "
                                   "optimizers); set train.mixed_precision=bf16 or no for every task")
        collate = collate or {}
        self.zero = zero_stage(acc)  # None without DeepSpeed
        self.groups = None  # under DeepSpeed: the per-task policy of its one optimizer (fused_zero.TaskGroups)
        if self.zero is None:
            self.model = acc.prepare(model)
        self.runs: dict[str, TaskRun] = {}
        for name, cfg in cfgs.items():
            tc = cfg.train
            set_seed(cfg.seed)  # where a run of its own (Trainer) seeds: the task's random stream starts here
            params = [p for p in model.tasks[name].parameters() if p.requires_grad]
            if not params:
                raise FusedConfigError(f"task {name} has no trainable parameters: choose an adaptor or a projector")
            g = torch.Generator().manual_seed(cfg.seed)  # the data order of a run of its own
            dl = DataLoader(data[name][0], batch_size=tc.batch_size, shuffle=True, generator=g,
                            collate_fn=collate.get(name), num_workers=cfg.data.num_workers)
            opt = None
            if self.zero is None:
                opt, dl = acc.prepare(make_adamw(params, tc), dl)
            val = data[name][1]
            val_dl = None if val is None else acc.prepare(DataLoader(
                val, batch_size=tc.batch_size, collate_fn=collate.get(name), num_workers=cfg.data.num_workers))
            self.runs[name] = TaskRun(name, cfg, tasks[name], dl, val_dl, opt, params)
            model.streams[name] = self.runs[name].rng = RngStream()
        if self.zero is not None:  # DeepSpeed takes one model and one optimizer, prepared together
            params = {name: run.params for name, run in self.runs.items()}
            train_cfgs = {name: cfg.train for name, cfg in cfgs.items()}
            check_zero_groups(acc, params, train_cfgs)
            opt, self.groups = task_groups(params, train_cfgs)
            self.model, opt, *dls = acc.prepare(model, opt, *(run.train_dl for run in self.runs.values()))
            for run, dl in zip(self.runs.values(), dls):
                run.opt, run.train_dl = opt, dl
        acc.register_save_state_pre_hook(keep_trainable(self.model))
        for run in self.runs.values():
            tc, n = run.cfg.train, len(run.train_dl)
            run.total_steps = min(tc.max_steps, n * tc.epochs) if tc.max_steps else n * tc.epochs
        self.global_step = 0

    def task_model(self, name: str) -> nn.Module:
        return self.acc.unwrap_model(self.model).tasks[name]

    # --------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, TrainState]:
        """Train every task; each task's ``progress.json`` (:mod:`.progress`) follows it."""
        try:
            states = self._fit()
        except BaseException as e:
            for run in self.runs.values():
                self._report(run, "failed", error_text(e))
            raise
        for run in self.runs.values():
            self._report(run, "done")
        return states

    def _report(self, run: TaskRun, status: str, error: str = "") -> None:
        if not self.acc.is_main_process:
            return
        st = run.state
        val = next((r["val_ppl"] for r in reversed(st.history) if "val_ppl" in r), None)
        write_progress(run.cfg.output_dir, status=status, step=st.global_step, total_steps=run.total_steps,
                       epoch=round(st.epoch + st.step_in_epoch / max(len(run.train_dl), 1), 3),
                       epochs=run.cfg.train.epochs, loss=run.last_loss, val_ppl=val, error=error)

    def _fit(self) -> dict[str, TrainState]:
        acc = self.acc
        first = next(iter(self.cfgs.values())).train
        if first.resume and self.out is not None:
            load_fused_checkpoint(self, self.out)
        every = min((c.train.save_every_steps for c in self.cfgs.values() if c.train.save_every_steps), default=0)
        for run in self.runs.values():
            if acc.is_main_process:
                save_config(run.cfg, Path(run.cfg.output_dir) / "config.yaml")
            run.batches = run.walk(acc)
            if run.val_dl is not None and not run.state.history:
                run.state.history.append({"epoch": 0, "step": 0, **self.evaluate(run)})
            self._report(run, "running")
        self.model.train()
        while True:
            live = [r for r in self.runs.values() if not r.done]
            if not live:
                break
            top = max(self.ratios[r.name] for r in live)
            active = [r for r in live if takes_part(self.ratios[r.name], top, self.global_step)]
            batches = {r.name: r.next_batch() for r in active}
            losses = self.model(batches)
            self._check(losses)
            tokens = acc.reduce(torch.stack([label_tokens(batches[r.name]) for r in active]).to(acc.device),
                                reduction="sum")
            # a task with no label tokens on any process this step takes no optimizer step
            stepping = {r.name for r, n in zip(active, tokens.tolist()) if n}
            if self.groups is not None:
                self.groups.stepping = stepping
            acc.backward(sum(losses.values()))  # DeepSpeed: also clips and steps each task (fused_zero)
            self.global_step += 1
            epochs_ended = False
            for run in active:
                tc = run.cfg.train
                if self.groups is None:
                    if run.name in stepping:
                        if tc.max_grad_norm:
                            acc.clip_grad_norm_(run.params, tc.max_grad_norm)
                        run.opt.step()
                    run.opt.zero_grad(set_to_none=True)
                epochs_ended |= self._advance(run, losses[run.name])
            if self.out is not None and (epochs_ended or (every and self.global_step % every == 0)
                                         or all(r.done for r in self.runs.values())):
                save_fused_checkpoint(self, self.out)
        for run in self.runs.values():
            self._final_validation(run)
        return {name: run.state for name, run in self.runs.items()}

    def _advance(self, run: TaskRun, loss: torch.Tensor) -> bool:
        """Count the step; validate at the task's epoch end (returns whether the epoch ended)."""
        st = run.state
        st.global_step += 1
        st.step_in_epoch += 1
        if st.global_step % run.cfg.train.log_every == 0 or st.global_step == 1 or run.done:
            run.last_loss = loss.item()
            self._report(run, "running")
        if st.step_in_epoch >= len(run.train_dl):  # the task's epoch ends
            row = {"epoch": st.epoch + 1, "step": st.global_step}
            if run.val_dl is not None and (st.epoch + 1) % run.cfg.train.eval_every_epochs == 0:
                self._validate(run, row)
            st.history.append(row)
            st.epoch, st.step_in_epoch = st.epoch + 1, 0
            return True
        return False

    def _final_validation(self, run: TaskRun) -> None:
        """The parameters a task ends with are always validated (max_steps may stop it mid-epoch)."""
        st = run.state
        evaluated = [r for r in st.history if "val_ppl" in r]
        if run.val_dl is None or not st.global_step or (evaluated and evaluated[-1]["step"] == st.global_step):
            return
        done = round(st.epoch + st.step_in_epoch / len(run.train_dl), 3)
        row = {"epoch": int(done) if done == int(done) else done, "step": st.global_step}
        self._validate(run, row)
        st.history.append(row)

    def _validate(self, run: TaskRun, row: dict) -> None:
        st = run.state
        row.update(self.evaluate(run))
        self.acc.print(f"{run.name} epoch {row['epoch']}: val perplexity {row['val_ppl']:.3f}")
        if not math.isfinite(row["val_ppl"]):
            raise DivergenceError(f"task {run.name} diverged: validation perplexity {row['val_ppl']} at step "
                                  f"{st.global_step}; lower {run.name}'s train.lr (now {run.cfg.train.lr:g})")
        if st.best_val_ppl is None or row["val_ppl"] < st.best_val_ppl:
            st.best_val_ppl, st.best_epoch = row["val_ppl"], row["epoch"]
            if self.write_plugins:
                model = self.task_model(run.name)
                state = gathered_trainable(self.acc, model)  # every rank: ZeRO-3 gathers the task's shards
                if self.acc.is_main_process:
                    task_plugin(model, run.cfg, run.task, Path(run.cfg.output_dir) / "plugin", state)

    def _check(self, losses: dict[str, torch.Tensor]) -> None:
        stacked = self.acc.gather(torch.stack([v.detach().float() for v in losses.values()]))
        if not bool(torch.isfinite(stacked).all()):
            bad = [n for n, v in losses.items() if not torch.isfinite(v)] or ["(on another process)"]
            raise DivergenceError(f"fused training diverged at step {self.global_step + 1}: task {bad[0]}'s loss "
                                  "is not finite; lower that task's train.lr or set its train.max_grad_norm")

    @torch.no_grad()
    def evaluate(self, run: TaskRun) -> dict:
        model = self.task_model(run.name)
        model.eval()
        with run.rng.active():
            nll, count = target_nll(model, run.val_dl, self.acc.gather_for_metrics)
        model.train()
        return {"val_loss": nll / max(count, 1), "val_ppl": perplexity(nll, max(count, 1)), "val_tokens": count}

    def results(self) -> dict:
        """results.json of the fused run: per task what ``train_task.py`` reports, plus the world."""
        out = {}
        for name, run in self.runs.items():
            st = run.state
            out[name] = {"task": run.task.name, "best_epoch": st.best_epoch, "best_val_ppl": st.best_val_ppl,
                         "history": st.history, "global_step": st.global_step,
                         "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in run.params)}
        return {"tasks": out, "global_step": self.global_step, "world_size": self.acc.num_processes,
                "distributed_type": str(self.acc.distributed_type), "zero_stage": self.zero}

    def write_results(self, root: str | Path, **extra) -> dict:
        """Each task's results.json in its output_dir, and the fused run's (with ``extra``) in ``root``."""
        results = {**self.results(), **extra}
        if self.acc.is_main_process:
            for name, run in self.runs.items():
                write_json(results["tasks"][name], Path(run.cfg.output_dir) / "results.json")
            write_json(results, Path(root) / "results.json")
        return results


def fused_data(cfgs: dict[str, RunConfig], tasks: dict, model: FusedModel, extras: dict, progress: bool = True,
               build=None) -> dict[str, tuple[Dataset, Dataset | None]]:
    """{task: (train, val)} built by each task's own config (:func:`~mtcpeft.training.build.build_datasets`)."""
    from .build import build_datasets

    build = build or build_datasets
    out = {}
    for name, cfg in cfgs.items():
        tok, layout = extras[name]
        data = build(cfg, tasks[name], model.tasks[name], tok, layout, progress=progress)
        out[name] = (data["train"][0], data["val"][0])
    return out
