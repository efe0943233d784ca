"""One readable training loop on accelerate (DDP, DeepSpeed ZeRO via the accelerate config, mixed precision).

``fit`` trains whatever trainable parameters the model has (adaptors, projector) on batches the model takes as
keyword arguments (``model(**batch).loss``), evaluates validation perplexity after each epoch, keeps the best
epoch, and writes checkpoints atomically (every ``save_every_steps`` optimizer steps and at each epoch end) that
``resume`` continues from exactly where they stopped: same parameters, optimizer, RNG and data order.
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .io import write_json
from .losses import token_nll

CHECKPOINT = "checkpoint"


@dataclass
class TrainState:
    """Progress that a checkpoint carries besides tensors (``trainer_state.json``)."""

    epoch: int = 0  # epoch in progress (0-based)
    step_in_epoch: int = 0  # batches of that epoch already consumed
    global_step: int = 0  # optimizer steps taken
    best_val_ppl: float | None = None
    best_epoch: int | None = None
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


def make_accelerator(train_cfg, output_dir: str, log: bool = True, find_unused_parameters: bool = False) -> Accelerator:
    """gloo when there is no GPU (DeepSpeed's default nccl would fail); seedable sampler for exact resume.
    ``find_unused_parameters``: DDP tolerates parameters a batch does not reach (the projector in a batch of
    text-only examples)."""
    configure_cpu_threads()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # set by accelerate launch / torchrun
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    if find_unused_parameters:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(
        gradient_accumulation_steps=train_cfg.grad_accum,
        mixed_precision=train_cfg.mixed_precision,
        log_with="tensorboard" if log else None,
        project_dir=output_dir,
        kwargs_handlers=handlers,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


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


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    """Owns the accelerator, the prepared model/optimizer/loaders and the :class:`TrainState`."""

    def __init__(self, cfg, model: torch.nn.Module, train_ds: Dataset, val_ds: Dataset | dict[str, Dataset] | None,
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
            raise ValueError("the model has no trainable parameters: choose an adaptor (or 'full') or a projector")
        self.num_trainable = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=self.tc.lr, betas=tuple(self.tc.betas), weight_decay=self.tc.weight_decay)
        g = torch.Generator().manual_seed(cfg.seed)
        train_dl = DataLoader(train_ds, batch_size=self.tc.batch_size, shuffle=True, collate_fn=collate,
                              generator=g, drop_last=False, num_workers=cfg.data.num_workers)
        vals = {} if val_ds is None else dict(val_ds) if isinstance(val_ds, dict) else {"": val_ds}
        self.model, self.opt, self.train_dl = self.acc.prepare(model, opt, train_dl)
        self.val_dls = {name: self.acc.prepare(DataLoader(ds, batch_size=self.tc.batch_size, collate_fn=collate,
                                                          num_workers=cfg.data.num_workers))
                        for name, ds in vals.items()}
        self.state = TrainState()
        self.on_best = on_best
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        # checkpoints hold the trainable tensors only, not a copy of the frozen LM
        self.acc.register_save_state_pre_hook(lambda models, weights, _dir: _keep_trainable(weights, trainable))

    # --------------------------------------------------------------------------------------------- loop
    def fit(self) -> TrainState:
        if self.tc.resume:
            self.resume()  # replaces self.state
        acc, tc, st = self.acc, self.tc, self.state
        acc.init_trackers("tb", config=_flat(self.cfg))
        acc.print(f"trainable parameters: {self.num_trainable:,}  |  processes: {acc.num_processes} "
                  f"({acc.distributed_type}), {torch.get_num_threads()} threads each  |  output: {self.out}")
        if self.val_dls and not st.history:  # where validation starts, before any update
            row = {"epoch": 0, "step": 0, **self.evaluate()}
            st.history.append(row)
            acc.log(_val_logs(row), step=0)
            acc.print(f"before training: val perplexity {row['val_ppl']:.3f}")
        steps_per_epoch = math.ceil(len(self.train_dl) / tc.grad_accum)
        total = tc.max_steps or steps_per_epoch * tc.epochs
        bar = tqdm(total=total, initial=st.global_step, disable=not acc.is_main_process, desc="train", unit="step")
        tokens, t0 = 0, time.perf_counter()
        done = st.global_step >= total
        while st.epoch < tc.epochs and not done:
            self.train_dl.set_epoch(st.epoch)
            loader = acc.skip_first_batches(self.train_dl, st.step_in_epoch) if st.step_in_epoch else self.train_dl
            self.model.train()
            for batch in loader:
                with acc.accumulate(self.model):
                    loss = self.model(**batch).loss
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
                if tc.save_every_steps and st.global_step % tc.save_every_steps == 0:
                    self.save_checkpoint()
                if tc.max_steps and st.global_step >= tc.max_steps:
                    done = True
                    break
            if st.step_in_epoch >= len(self.train_dl):
                self.end_epoch()
            elif done:  # max_steps reached mid-epoch: keep a checkpoint to continue from
                self.save_checkpoint()
        bar.close()
        return st

    def finish(self) -> None:
        """Flush the trackers and end the run (accelerate then also tears down the process group: collective
        calls such as a final parameter check go before this). A DeepSpeed engine is destroyed first, on every
        rank at once: its ZeRO-3 hooks and optimizer hold communication state that must not outlive the group."""
        self.acc.wait_for_everyone()
        wrapped = getattr(self.acc, "deepspeed_engine_wrapped", None)
        if wrapped is not None and hasattr(wrapped.engine, "destroy"):
            wrapped.engine.destroy()
        self.acc.end_training()

    def end_epoch(self) -> None:
        st = self.state
        row = {"epoch": st.epoch + 1, "step": st.global_step}
        if self.val_dls and (st.epoch + 1) % self.tc.eval_every_epochs == 0:
            row.update(self.evaluate())
            self.acc.log(_val_logs(row), step=st.global_step)
            self.acc.print(f"epoch {st.epoch + 1}: val perplexity {row['val_ppl']:.3f}")
            if st.best_val_ppl is None or row["val_ppl"] < st.best_val_ppl:
                st.best_val_ppl, st.best_epoch = row["val_ppl"], st.epoch + 1
                if self.on_best is not None:
                    self.on_best(self)
        st.history.append(row)
        st.epoch, st.step_in_epoch = st.epoch + 1, 0
        self.save_checkpoint()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Perplexity = exp(mean NLL over every label token of the validation set), gathered over processes;
        with several validation sets also ``val_ppl/<task>`` for each."""
        self.model.eval()
        row, total, total_n = {}, 0.0, 0
        for name, dl in self.val_dls.items():
            nll, count = torch.zeros((), dtype=torch.float64), 0
            for batch in tqdm(dl, desc=f"val {name}".strip(), leave=False, disable=not self.acc.is_main_process):
                logits = self.model(**batch).logits  # may cover only the last positions (see losses.token_nll)
                per_ex, n = token_nll(logits, batch["labels"])
                per_ex, n = self.acc.gather_for_metrics((per_ex, n))
                nll += per_ex.double().sum().cpu()
                count += int(n.sum())
            if name:
                row[f"val_ppl/{name}"] = math.exp(float(nll) / max(count, 1))
            total, total_n = total + float(nll), total_n + count
        self.model.train()
        mean = total / max(total_n, 1)
        return {"val_loss": mean, "val_ppl": math.exp(mean), "val_tokens": total_n, **row}

    # -------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """Write ``checkpoint.tmp`` completely, then swap it for ``checkpoint``: a crash leaves the old one."""
        acc, final = self.acc, self.out / CHECKPOINT
        tmp, old = final.with_name(CHECKPOINT + ".tmp"), final.with_name(CHECKPOINT + ".old")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)  # before any rank writes its shard into it (DeepSpeed: every rank saves)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()  # every rank's files (shards, RNG states) are in tmp before it is renamed
        if acc.is_main_process:
            write_json(asdict(self.state), tmp / "trainer_state.json")
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def resume(self) -> None:
        ckpt = self.out / CHECKPOINT
        if not (ckpt / "trainer_state.json").is_file():
            self.acc.print(f"no checkpoint in {ckpt}: starting from scratch")
            return
        # our checkpoints hold the trainable tensors only (strict=False); DeepSpeed saves and loads its own way
        self.acc.load_state(str(ckpt), **({} if zero_stage(self.acc) is not None else {"strict": False}))
        self.state = TrainState(**json.loads((ckpt / "trainer_state.json").read_text()))
        self.acc.print(f"resumed from {ckpt}: epoch {self.state.epoch + 1}, step {self.state.global_step}")


def _val_logs(row: dict) -> dict:
    """Tensorboard scalars of one validation row: val/loss, val/ppl and val/<task>/ppl."""
    logs = {"val/loss": row["val_loss"], "val/ppl": row["val_ppl"]}
    logs.update({f"val/{k.split('/', 1)[1]}/ppl": v for k, v in row.items() if k.startswith("val_ppl/")})
    return logs


def _keep_trainable(weights: list[dict], trainable: set[str]) -> None:
    for w in weights:
        for k in [k for k in w if k not in trainable]:
            del w[k]


def _flat(cfg, prefix: str = "") -> dict:
    """Nested dataclass config -> flat {"train.lr": 1e-4} of scalars (tensorboard hparams)."""
    out = {}
    for k, v in (asdict(cfg) if not isinstance(cfg, dict) else cfg).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out
