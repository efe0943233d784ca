"""One readable training loop on accelerate (DDP, DeepSpeed ZeRO via the accelerate config, mixed precision).

``fit`` trains whatever trainable parameters the model has (adaptors, projector) on batches the model takes as
keyword arguments (``model(**batch).loss``), evaluates validation perplexity after each epoch and at the end of
training (``max_steps`` may stop mid-epoch), keeps the best evaluation, and writes checkpoints (every
``save_every_steps`` optimizer steps, at each epoch end and at the stop) that ``resume`` continues from exactly
where they stopped: same parameters, optimizer, RNG and data order.

The training set may be a stream (:class:`~mtcpeft.data.streaming.ItemStream`, ``data.streaming=true``): it has no
length, so ``max_steps`` bounds training (``epochs`` still caps the passes). Each process reads its own part of the
stream (the loader is not prepared by accelerate); an epoch ends for every process when one of them runs out of items
(the others' leftovers of that epoch are not used). A checkpoint holds each process's stream position
(``stream_state.<rank>.json``), and resuming needs the same number of processes; what is exact is said in
:mod:`mtcpeft.data.streaming`.

Nothing silently wrong: a non-finite loss, parameter or validation perplexity stops the run with
:class:`DivergenceError` before anything of it is saved; a kill at any moment of a checkpoint write leaves a
complete checkpoint to resume from (:func:`recover_checkpoint`); a checkpoint made with another model or adaptor
config is refused with the tensors and config keys that differ (:class:`CheckpointMismatchError`).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs,
                               send_to_device, set_seed)
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mtcpeft.config import ConfigError, flat_config, save_config
from mtcpeft.core.losses import perplexity, target_nll
from mtcpeft.data.dataset import EmptySplitError
from mtcpeft.data.streaming import ItemStream
from mtcpeft.io import remove_tree, swap_dir, write_json
from .precision import resolve_precision
from .progress import error_text, write_progress

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.json"  # written last: a checkpoint directory holding it is complete
RUN_CONFIG = "run_config.json"  # the flat config of the run that wrote the checkpoint (to name what differs)
STREAM_STATE = "stream_state.{rank}.json"  # a streaming run: where each process's stream stood


class DivergenceError(ConfigError):
    """The loss, a trainable tensor or the validation perplexity is not finite: the config (learning rate,
    precision) made training diverge. Nothing of the diverged state is saved."""


class CheckpointMismatchError(ConfigError):
    """``train.resume`` found a checkpoint whose trainable tensors do not fit the model built from this config."""


@dataclass
class TrainState:
    """Progress that a checkpoint carries besides tensors (``trainer_state.json``)."""

    epoch: int = 0  # epoch in progress (0-based)
    step_in_epoch: int = 0  # batches of that epoch already consumed
    global_step: int = 0  # optimizer steps taken
    best_val_ppl: float | None = None
    best_epoch: float | None = None  # a fraction when the best evaluation was where max_steps stopped mid-epoch
    history: list[dict] = field(default_factory=list)  # one row per evaluated epoch


def configure_cpu_threads() -> int:
    """Give each process its share of the cores when there is no GPU.

    ``accelerate launch`` without ``--cpu`` sets OMP_NUM_THREADS=1, which makes a single CPU process train about
    1.7x slower here; several processes on few cores need a share each or they oversubscribe (OpenMP).
    ``MTCPEFT_THREADS`` overrides the choice.
    """
    if torch.cuda.is_available():
        return torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    threads = int(os.environ.get("MTCPEFT_THREADS", 0)) or max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)
    return threads


def make_accelerator(train_cfg, output_dir: str, log: bool = True, find_unused_parameters: bool = False,
                     engine_clipping: bool = True) -> Accelerator:
    """gloo when there is no GPU (DeepSpeed's default nccl would fail); seedable sampler for exact resume.
    ``find_unused_parameters``: DDP tolerates parameters a batch does not reach (the projector in a batch of
    text-only examples). ``engine_clipping``: under DeepSpeed the engine clips by ``train.max_grad_norm``
    (:func:`set_engine_clipping`); False: it clips nothing (the caller clips, as fused training does per task)."""
    configure_cpu_threads()
    precision, why = resolve_precision(train_cfg.mixed_precision)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # set by accelerate launch / torchrun
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    if find_unused_parameters:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    acc = Accelerator(
        gradient_accumulation_steps=train_cfg.grad_accum,
        mixed_precision=precision,
        log_with="tensorboard" if log else None,
        project_dir=output_dir,
        kwargs_handlers=handlers,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    acc.print(f"precision: {'fp32' if precision == 'no' else precision} ({why})")
    set_engine_clipping(acc, train_cfg.max_grad_norm if engine_clipping else None, engine_clipping)
    return acc


def set_engine_clipping(acc: Accelerator, max_norm: float | None, from_run_config: bool = True) -> None:
    """Under DeepSpeed the engine clips gradients by its config's ``gradient_clipping`` inside
    ``accelerator.backward`` (accelerate's ``clip_grad_norm_`` does nothing there), and accelerate fills an unset
    value with 1.0: set it to ``max_norm`` (0: no clipping) so that ``train.max_grad_norm`` means the same with and
    without DeepSpeed. A launcher value (``gradient_clipping`` in the DeepSpeed config) that differs is refused."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    want = float(max_norm or 0.0)
    given = plugin.deepspeed_config.get("gradient_clipping", "auto")
    if given != "auto" and float(given) != want:
        owner = "train.max_grad_norm" if from_run_config else "each fused task's own train.max_grad_norm"
        raise ConfigError(f"the DeepSpeed config sets gradient_clipping={given}, but this run clips by {owner} "
                          f"({max_norm if from_run_config else 'per task'}); remove gradient_clipping from the "
                          "DeepSpeed/accelerate config (the run config decides)")
    plugin.deepspeed_config["gradient_clipping"] = want


def release_engine(acc: Accelerator) -> None:
    """Destroy a DeepSpeed engine on every rank at once (call it before ``end_training``): its ZeRO-3 hooks and
    optimizer hold communication state that must not outlive the process group."""
    acc.wait_for_everyone()
    wrapped = getattr(acc, "deepspeed_engine_wrapped", None)
    if wrapped is not None and hasattr(wrapped.engine, "destroy"):
        wrapped.engine.destroy()


def zero_stage(acc: Accelerator) -> int | None:
    """The DeepSpeed ZeRO stage this run really uses (None without DeepSpeed)."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else None


def trainable_digest(acc: Accelerator, model: torch.nn.Module) -> str:
    """A hash of this rank's full trainable tensors (ZeRO-3 shards are gathered first): equal on every rank
    of a correct data-parallel run. Every rank must call it."""
    import hashlib
    from contextlib import nullcontext

    params = [(n, p) for n, p in acc.unwrap_model(model).named_parameters() if p.requires_grad]
    gather = nullcontext()
    if zero_stage(acc) == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
    h = hashlib.sha256()
    with gather:
        for n, p in params:
            h.update(n.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def make_adamw(params: list[torch.nn.Parameter], tc) -> torch.optim.AdamW:
    """AdamW with the run's lr, betas and weight decay. On CPU it runs torch's fused kernel: measured here (1 thread,
    rank-8 LoRA tensors of SmolLM2's 30 layers) 5 ms vs 23 ms per step for one context and 35 ms vs 147 ms for 16,
    where the default per-tensor loop dominates; elsewhere torch's default choice stands."""
    fused = True if params and all(p.device.type == "cpu" for p in params) else None
    return torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay, fused=fused)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    """Owns the accelerator, the prepared model/optimizer/loaders and the :class:`TrainState`."""

    def __init__(self, cfg, model: torch.nn.Module, train_ds: Dataset | ItemStream,
                 val_ds: Dataset | dict[str, Dataset] | None,
                 collate: Callable | None = None, accelerator: Accelerator | None = None,
                 on_best: Callable[["Trainer"], None] | None = None):
        """``val_ds`` may be a dict {task: dataset}: each is evaluated on its own (``val/<task>/ppl``) and the
        best epoch is chosen on the perplexity over all of their tokens."""
        self.cfg, self.tc = cfg, cfg.train
        self.out = Path(cfg.output_dir)
        self.acc = accelerator or make_accelerator(self.tc, str(self.out))
        set_seed(cfg.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters: choose an adaptor (or train.mode=full) or a "
                             "projector")
        self.num_trainable = sum(p.numel() for p in params)
        opt = make_adamw(params, self.tc)
        vals = {} if val_ds is None else dict(val_ds) if isinstance(val_ds, dict) else {"": val_ds}
        self.stream = train_ds if isinstance(train_ds, ItemStream) else None
        self.collate = collate
        self.stream_state: dict | None = None  # where a resumed stream continues (its epoch in progress)
        self.stream_ended = False  # the stream's epoch in progress ran out (on some process)
        if self.stream is not None:
            if not self.tc.max_steps:
                raise ConfigError("training on a stream (data.streaming=true) needs train.max_steps: a stream has no "
                                  "length to count epochs of steps by; set train.max_steps=N")
            self.model, self.opt = self.acc.prepare(model, opt)
            self.train_dl = None
        else:
            g = torch.Generator().manual_seed(cfg.seed)
            train_dl = DataLoader(train_ds, batch_size=self.tc.batch_size, shuffle=True, collate_fn=collate,
                                  generator=g, drop_last=False, num_workers=cfg.data.num_workers)
            self.model, self.opt, self.train_dl = self.acc.prepare(model, opt, train_dl)
        self.val_dls = {name: self.acc.prepare(DataLoader(ds, batch_size=self.tc.batch_size, collate_fn=collate,
                                                          num_workers=cfg.data.num_workers))
                        for name, ds in vals.items()}
        self.state = TrainState()
        self.on_best = on_best
        self.total_steps: int | None = None  # known once fit starts
        self.last_loss: float | None = None  # the latest logged train loss (progress.json)
        self.last_val_ppl: float | None = None  # the latest validation perplexity (progress.json)
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        # checkpoints hold the trainable tensors only, not a copy of the frozen LM
        self.acc.register_save_state_pre_hook(lambda models, weights, _dir: _keep_trainable(weights, trainable))

    # --------------------------------------------------------------------------------------------- loop
    def fit(self) -> TrainState:
        """Train (see the module docstring); ``progress.json`` in the output directory follows the run."""
        try:
            state = self._fit()
        except BaseException as e:
            self._report("failed", error_text(e))
            raise
        self._report("done")
        return state

    def _report(self, status: str, error: str = "") -> None:
        """Rewrite ``progress.json`` (:mod:`.progress`) from the state; the main process only."""
        if not self.acc.is_main_process:
            return
        st = self.state
        val = self.last_val_ppl or next((r["val_ppl"] for r in reversed(st.history) if "val_ppl" in r), None)
        write_progress(self.out, status=status, step=st.global_step, total_steps=self.total_steps,
                       epoch=self._epochs_done(),
                       epochs=self.tc.epochs, loss=self.last_loss, val_ppl=val, error=error)

    def _fit(self) -> TrainState:
        if self.tc.resume:
            self.resume()  # replaces self.state
        acc, tc, st = self.acc, self.tc, self.state
        if acc.is_main_process:  # after resume checked that the checkpoint fits this config
            save_config(self.cfg, self.out / "config.yaml")
        acc.init_trackers("tb", config=_flat(self.cfg))
        acc.print(f"trainable parameters: {self.num_trainable:,}  |  processes: {acc.num_processes} "
                  f"({acc.distributed_type}), {torch.get_num_threads()} threads each  |  output: {self.out}")
        if self.val_dls and not st.history:  # where validation starts, before any update
            row = {"epoch": 0, "step": 0, **self.evaluate()}
            st.history.append(row)
            acc.log(_val_logs(row), step=0)
            acc.print(f"before training: val perplexity {row['val_ppl']:.3f}")
        if self.stream is not None:
            acc.print(self.stream.summary())
        total = self.total_steps = tc.max_steps or math.ceil(len(self.train_dl) / tc.grad_accum) * tc.epochs
        self._report("running")
        tokens, t0 = 0, time.perf_counter()
        done = st.global_step >= total
        # closed even on an error, which then prints on a line of its own
        with tqdm(total=total, initial=st.global_step, disable=not acc.is_main_process, desc="train",
                  unit="step") as bar:
            while st.epoch < tc.epochs and not done:
                loader = self._epoch_batches()
                self.model.train()
                for batch in loader:
                    with acc.accumulate(self.model):
                        loss = self.model(**batch).loss
                        self._check_loss(loss)
                        acc.backward(loss)
                        if tc.max_grad_norm and acc.sync_gradients:
                            acc.clip_grad_norm_(self.model.parameters(), tc.max_grad_norm)
                        self.opt.step()
                        self.opt.zero_grad()
                    st.step_in_epoch += 1
                    tokens += int(batch["attention_mask"].sum()) * acc.num_processes
                    if not acc.sync_gradients:
                        continue
                    st.global_step += 1
                    bar.update(1)
                    if st.global_step % tc.log_every == 0 or st.global_step == 1:
                        rate = tokens / (time.perf_counter() - t0)
                        acc.log({"train/loss": loss.item(), "train/tokens_per_s": rate,
                                 "train/peak_mem_mb": peak_memory_mb()}, step=st.global_step)
                        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:,.0f}")
                        self.last_loss = loss.item()
                        self._report("running")
                    if tc.save_every_steps and st.global_step % tc.save_every_steps == 0:
                        self.save_checkpoint()
                    if tc.max_steps and st.global_step >= tc.max_steps:
                        done = True
                        break
                if self._epoch_over():
                    self.end_epoch()
                elif done:  # max_steps reached mid-epoch: keep a checkpoint to continue from
                    self.save_checkpoint()
        evaluated = [r for r in st.history if "val_ppl" in r]
        if self.val_dls and st.global_step and (not evaluated or evaluated[-1]["step"] != st.global_step):
            # the parameters training ends with are always validated (and may be the best): max_steps stopped
            # mid-epoch, or the last epoch was not an evaluation epoch. After the checkpoint, so that a resumed run
            # continues exactly as an uninterrupted one (the row is in results, not in the checkpoint).
            done_epochs = self._epochs_done()
            row = {"epoch": int(done_epochs) if done_epochs == int(done_epochs) else done_epochs,
                   "step": st.global_step}
            self._validate(row, f"end of training (step {st.global_step}, epoch {row['epoch']})")
            st.history.append(row)
        return st

    def _epoch_batches(self):
        """The batches left of the epoch in progress."""
        st = self.state
        if self.stream is None:
            self.train_dl.set_epoch(st.epoch)
            skip = st.step_in_epoch
            return self.acc.skip_first_batches(self.train_dl, skip) if skip else self.train_dl
        return self._stream_batches()

    def _stream_batches(self):
        """This process's batches of the stream's epoch in progress, until any process runs out (every process
        learns it in the same step: DDP needs the same number of steps on each)."""
        st = self.state
        resumed = bool(st.step_in_epoch)
        ds = self.stream.epoch(st.epoch, self.stream_state if resumed else None)
        self.stream_state, self.stream_ended = None, False
        batches = iter(DataLoader(ds, batch_size=self.tc.batch_size, collate_fn=self.collate))
        for n in itertools.count():
            batch = next(batches, None)
            have = self.acc.gather(torch.tensor([batch is not None], dtype=torch.float32, device=self.acc.device))
            if not bool(have.all()):
                if n == 0 and not resumed:  # else every epoch would end at once and the run train nothing
                    why = self.stream.report.why_empty() if self.stream.report is not None else ""
                    raise EmptySplitError(f"the streamed training split gave process {int(have.argmin())} no usable "
                                          f"example{': ' + why if why else ''}; data: {self.cfg.data.describe('train')}"
                                          "; fix the data or point data.hf_path at other files")
                self.stream_ended = True
                return
            yield send_to_device(batch, self.acc.device)

    def _epoch_over(self) -> bool:
        return self.stream_ended if self.stream is not None else self.state.step_in_epoch >= len(self.train_dl)

    def _epochs_done(self) -> float:
        """Epochs done, with the fraction of the one in progress (a stream: whole epochs only, its length unknown)."""
        st = self.state
        if self.stream is not None:
            return st.epoch
        return round(st.epoch + st.step_in_epoch / max(len(self.train_dl), 1), 3)

    def finish(self) -> None:
        """Flush the trackers and end the run (accelerate then also tears down the process group: collective
        calls such as a final parameter check go before this). A DeepSpeed engine is destroyed first
        (:func:`release_engine`)."""
        release_engine(self.acc)
        self.acc.end_training()

    def end_epoch(self) -> None:
        st = self.state
        row = {"epoch": st.epoch + 1, "step": st.global_step}
        if self.val_dls and (st.epoch + 1) % self.tc.eval_every_epochs == 0:
            self._validate(row, f"epoch {st.epoch + 1}")
        st.history.append(row)
        st.epoch, st.step_in_epoch = st.epoch + 1, 0
        if self.stream is None or self.acc.sync_gradients:  # a stream's epoch may end mid-accumulation: no state
            self.save_checkpoint()  # to resume from there (the gradients are not saved); the next step's will do

    def _validate(self, row: dict, label: str) -> None:
        """Evaluate into ``row``; a better (finite) perplexity than the best so far calls ``on_best``."""
        st = self.state
        row.update(self.evaluate())
        self.acc.log(_val_logs(row), step=st.global_step)
        self.acc.print(f"{label}: val perplexity {row['val_ppl']:.3f}")
        if not math.isfinite(row["val_ppl"]):  # nan never compares better, so it would win only as the first
            raise DivergenceError(f"training diverged: the validation perplexity is {row['val_ppl']} at {label}; "
                                  f"{self._advice()}")
        if st.best_val_ppl is None or row["val_ppl"] < st.best_val_ppl:
            st.best_val_ppl, st.best_epoch = row["val_ppl"], row["epoch"]
            if self.on_best is not None:
                self.on_best(self)
        self.last_val_ppl = row["val_ppl"]
        self._report("running")

    def _advice(self) -> str:
        kept = [f"the plugin of epoch {self.state.best_epoch}"] if self.state.best_epoch is not None else []
        kept += ["the last checkpoint"] if (self.out / CHECKPOINT / STATE_FILE).is_file() else []
        return (f"lower train.lr (now {self.tc.lr:g}), set train.max_grad_norm or train.mixed_precision=no; "
                f"nothing diverged was saved{' (kept: ' + ' and '.join(kept) + ')' if kept else ''}")

    def _check_loss(self, loss: torch.Tensor) -> None:
        """Stop before a non-finite loss reaches the optimizer (every rank sees every rank's loss, so all stop)."""
        losses = self.acc.gather(loss.detach().float().reshape(1))
        if not bool(torch.isfinite(losses).all()):
            bad = losses[~torch.isfinite(losses)][0].item()
            raise DivergenceError(f"training diverged: the loss is {bad} at step {self.state.global_step + 1} "
                                  f"(epoch {self.state.epoch + 1}); {self._advice()}")

    def _check_parameters(self) -> None:
        """Refuse to checkpoint non-finite trainable tensors (an update may overflow while its loss was finite)."""
        bad = next((n for n, p in self.model.named_parameters() if p.requires_grad
                    and not bool(torch.isfinite(getattr(p, "ds_tensor", p)).all())), None)  # ZeRO-3: own shard
        flags = self.acc.gather(torch.tensor([bad is not None], dtype=torch.float32, device=self.acc.device))
        if bool(flags.any()):
            raise DivergenceError(f"training diverged: trainable tensor {bad or '(on another process)'} is not finite "
                                  f"after step {self.state.global_step}; {self._advice()}")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Perplexity = exp(mean NLL over every label token of the validation set), gathered over processes;
        with several validation sets also ``val_ppl/<task>`` for each."""
        self.model.eval()
        row, total, total_n = {}, 0.0, 0
        for name, dl in self.val_dls.items():
            batches = tqdm(dl, desc=f"val {name}".strip(), leave=False, disable=not self.acc.is_main_process)
            nll, count = target_nll(self.model, batches, self.acc.gather_for_metrics)
            if name:
                row[f"val_ppl/{name}"] = perplexity(nll, max(count, 1))
            total, total_n = total + nll, total_n + count
        self.model.train()
        mean = total / max(total_n, 1)
        return {"val_loss": mean, "val_ppl": perplexity(total, max(total_n, 1)), "val_tokens": total_n, **row}

    # -------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """Write ``checkpoint.tmp`` completely (``trainer_state.json`` last), then swap it for ``checkpoint``.

        A kill at any point leaves a complete checkpoint (see :func:`recover_checkpoint`); the older one is
        deleted only once the newer one is complete."""
        self._check_parameters()
        acc, final = self.acc, self.out / CHECKPOINT
        tmp, old = final.with_name(CHECKPOINT + ".tmp"), final.with_name(CHECKPOINT + ".old")
        if acc.is_main_process:
            recover_checkpoint(self.out)  # leftovers of a kill: keep the newest complete one as `checkpoint`
            tmp.mkdir(parents=True)  # before any rank writes its shard into it (DeepSpeed: every rank saves)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if self.stream is not None:
            write_json(self.stream.state_dict(), tmp / STREAM_STATE.format(rank=acc.process_index))
        acc.wait_for_everyone()  # every rank's files (shards, RNG states) are in tmp before it is renamed
        if acc.is_main_process:
            write_json(_flat(self.cfg), tmp / RUN_CONFIG)
            write_json(asdict(self.state), tmp / STATE_FILE)  # last: from here on tmp is a complete checkpoint
            swap_dir(tmp, final, old)
        acc.wait_for_everyone()

    def resume(self) -> None:
        if self.acc.is_main_process:
            recover_checkpoint(self.out)
        self.acc.wait_for_everyone()
        ckpt = self.out / CHECKPOINT
        if not (ckpt / STATE_FILE).is_file():
            self.acc.print(f"no checkpoint in {ckpt}: starting from scratch")
            return
        self._check_checkpoint_fits(ckpt)
        # our checkpoints hold the trainable tensors only (strict=False); DeepSpeed saves and loads its own way
        self.acc.load_state(str(ckpt), **({} if zero_stage(self.acc) is not None else {"strict": False}))
        self.state = TrainState(**json.loads((ckpt / STATE_FILE).read_text()))
        if self.stream is not None:
            self.stream_state = self._load_stream_state(ckpt)
        self.acc.print(f"resumed from {ckpt}: epoch {self.state.epoch + 1}, step {self.state.global_step}")

    def _load_stream_state(self, ckpt: Path) -> dict:
        """This process's stream position in ``ckpt``; a checkpoint of another number of processes is refused (each
        process's position is in its own part of the stream)."""
        saved = len(list(ckpt.glob(STREAM_STATE.format(rank="*"))))
        if saved != self.acc.num_processes:
            raise CheckpointMismatchError(
                f"the checkpoint in {ckpt} holds the stream positions of {saved} processes (or none: not a streaming "
                f"run), this run has {self.acc.num_processes}; resume a streaming run with the number of processes "
                "(and data.streaming) it was made with")
        return json.loads((ckpt / STREAM_STATE.format(rank=self.acc.process_index)).read_text())

    def _check_checkpoint_fits(self, ckpt: Path) -> None:
        """Compare the checkpoint's trainable tensor names and shapes with the model's before loading (a
        size-mismatch deep inside load_state names neither the cause nor the fix)."""
        weights = ckpt / "model.safetensors"
        if zero_stage(self.acc) is not None or not weights.is_file():  # DeepSpeed checks its own layout
            return
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            saved = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        own = {n: list(p.shape) for n, p in self.model.named_parameters() if p.requires_grad}
        differ = sorted(k for k in set(saved) | set(own) if saved.get(k) != own.get(k))
        if not differ:
            return
        k = differ[0]
        msg = (f"the checkpoint in {ckpt} was made with another model or adaptor config: {len(differ)} trainable "
               f"tensors differ, e.g. {k} is {saved.get(k, 'absent')} there and {own.get(k, 'absent')} here")
        if (ckpt / RUN_CONFIG).is_file():
            then, now = json.loads((ckpt / RUN_CONFIG).read_text()), _flat(self.cfg)
            keys = [f"{key}={then.get(key)} (now {now.get(key)})" for key in sorted(set(then) | set(now))
                    if key.split(".")[0] in ("model", "adaptor") and then.get(key) != now.get(key)]
            if keys:
                msg += f"; config keys that differ: {', '.join(keys)}"
        raise CheckpointMismatchError(msg + "; resume with the config the checkpoint was made with, or train into "
                                            "another output_dir")


def recover_checkpoint(out: str | os.PathLike) -> Path | None:
    """Leave the newest complete checkpoint of ``out`` as ``out/checkpoint`` and nothing else; return it (None
    when there is no complete one). Main process only.

    A save writes ``checkpoint.tmp`` (complete once ``trainer_state.json`` is in it), renames ``checkpoint`` to
    ``checkpoint.old`` and ``checkpoint.tmp`` to ``checkpoint``, then deletes ``checkpoint.old``. Whatever step a
    kill interrupts, the complete ones are, newest first: tmp, checkpoint, old. Every step here is a rename or
    the deletion of an incomplete or older one, so a kill during recovery is recovered from as well.
    """
    final = Path(out) / CHECKPOINT
    tmp, old = final.with_name(CHECKPOINT + ".tmp"), final.with_name(CHECKPOINT + ".old")
    order = [d for d in (tmp, final, old) if d.exists()]
    complete = [d for d in order if (d / STATE_FILE).is_file()]
    for d in order:
        if d not in complete:
            remove_tree(d)  # a partly written (or partly deleted) checkpoint
    if not complete:
        return None
    newest = complete[0]
    if newest == tmp:
        if old.exists():
            remove_tree(old)  # older than checkpoint, and tmp (newer than both) is complete
        swap_dir(tmp, final, old)
    elif newest == old:
        os.replace(old, final)
    if old.exists():
        remove_tree(old)
    return final


def _val_logs(row: dict) -> dict:
    """Tensorboard scalars of one validation row: val/loss, val/ppl and val/<task>/ppl."""
    logs = {"val/loss": row["val_loss"], "val/ppl": row["val_ppl"]}
    logs.update({f"val/{k.split('/', 1)[1]}/ppl": v for k, v in row.items() if k.startswith("val_ppl/")})
    return logs


def _keep_trainable(weights: list[dict], trainable: set[str]) -> None:
    for w in weights:
        for k in [k for k in w if k not in trainable]:
            del w[k]


def _flat(cfg) -> dict:
    """Nested dataclass config -> flat {"train.lr": 1e-4} of scalars, others as text (tensorboard hparams)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_config(cfg).items()}
