"""Fused training (:mod:`.fused`) under DeepSpeed ZeRO-2/3: the K tasks' optimizers become ONE optimizer with one
param group per task.

Why one optimizer. accelerate hands DeepSpeed one model and one optimizer, and the engine runs backward, gradient
reduction, clipping and the optimizer step in one call (``accelerator.backward``). So a fused run under DeepSpeed
builds one torch AdamW whose param groups are the tasks, each with its own lr, betas and weight decay
(:func:`task_groups`, the settings of :func:`~mtcpeft.training.trainer.make_adamw`). ZeRO flattens each group into a
buffer of its own, partitions it across the ranks and steps the torch optimizer one group (ZeRO-2) or sub-group
(ZeRO-3) at a time on this rank's partition; AdamW is elementwise within a group, so each task's update is the one
it gets alone under the same launch.

Two things DeepSpeed would do differently from a task's own run are handled by a step pre-hook on that torch
optimizer (:meth:`TaskGroups.pre_step`), which runs on each group's partition right before its update:

- Clipping. DeepSpeed clips by ONE norm over every group (its ``gradient_clipping``). Here the engine clips
  nothing (``make_accelerator(engine_clipping=False)``) and each task's group is clipped by that task's own
  ``train.max_grad_norm`` over that task's gradient norm (the ranks' partition norms all-reduced), with DeepSpeed's
  formula: a task alone under the same launch has one group, which the engine clips by the same value
  (:func:`~mtcpeft.training.trainer.set_engine_clipping`). Only the norm's float summation order differs.
- Sitting out. ZeRO gives the optimizer a zero gradient for parameters no backward reached; torch AdamW would still
  move them (momentum, weight decay) and count a step. The hook drops the gradient (``.grad = None``) of every
  group whose task takes no optimizer step this fused step (not in the step by ``ratios``, its steps done, or no
  label tokens on any process), and torch AdamW leaves a parameter without ``.grad`` untouched: its values, moments
  and step count stay as they were, so ratios and empty batches are as exact as without DeepSpeed.

A task whose group ZeRO-3 would split into sub-groups (more trainable elements than its ``sub_group_size``,
1e9 by default) could not be clipped by its whole norm in the hook, so clipping it is refused.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import Accelerator

from mtcpeft.config import ConfigError

TASK_KEY = "task"  # the param-group key naming its task


class TaskGroups:
    """The per-task policy of one fused DeepSpeed optimizer: ``stepping`` (the tasks that take an optimizer step
    this fused step; set before ``accelerator.backward``) and each task's ``max_norms``."""

    def __init__(self, max_norms: dict[str, float | None]):
        self.max_norms = max_norms
        self.stepping: set[str] = set()

    def pre_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        """torch step pre-hook: for every group DeepSpeed lets the optimizer see now (ZeRO-2: one, ZeRO-3: one
        sub-group), drop a sitting-out task's gradients or clip a stepping task's. Every rank runs it on the same
        groups in the same order (``stepping`` is the same everywhere), so the all-reduce below is collective."""
        for group in optimizer.param_groups:
            grads = [p for p in group["params"] if p.grad is not None]
            if not grads:
                continue
            task = group[TASK_KEY]
            if task not in self.stepping:
                for p in grads:
                    p.grad = None
                continue
            max_norm = self.max_norms[task]
            if max_norm:
                clip_partitioned(grads, max_norm)


def clip_partitioned(params: list[torch.Tensor], max_norm: float) -> None:
    """Scale the gradients of one task's partitions (this rank's share; the others hold the rest) so that the
    task's whole gradient norm is at most ``max_norm``, as DeepSpeed's ZeRO clipping computes it: divide by
    max(1, (norm + 1e-6) / max_norm)."""
    sq = torch.stack([p.grad.float().pow(2).sum() for p in params]).sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    clip = torch.clamp((sq.sqrt() + 1e-6) / max_norm, min=1.0)
    if float(clip) != 1.0:
        for p in params:
            p.grad.mul_(1.0 / clip)


def task_groups(params: dict[str, list[torch.nn.Parameter]], train_cfgs: dict) -> tuple[torch.optim.AdamW, TaskGroups]:
    """One AdamW holding one group per task ({task: its trainable parameters}, {task: its train config}), with the
    :class:`TaskGroups` hook registered on it. Runs torch's fused kernel on CPU, as ``make_adamw`` does."""
    groups = [{"params": ps, TASK_KEY: name, "lr": train_cfgs[name].lr, "betas": tuple(train_cfgs[name].betas),
               "weight_decay": train_cfgs[name].weight_decay} for name, ps in params.items()]
    cpu = all(p.device.type == "cpu" for ps in params.values() for p in ps)
    opt = torch.optim.AdamW(groups, fused=True if cpu else None)
    policy = TaskGroups({name: tc.max_grad_norm for name, tc in train_cfgs.items()})
    opt.register_step_pre_hook(policy.pre_step)
    return opt, policy


def check_zero_groups(acc: Accelerator, params: dict[str, list[torch.nn.Parameter]], train_cfgs: dict) -> None:
    """Refuse a clipped task that ZeRO-3 would split into several sub-groups (see the module docstring)."""
    plugin = acc.state.deepspeed_plugin
    if int(plugin.zero_stage) != 3:
        return
    size = float(plugin.deepspeed_config.get("zero_optimization", {}).get("sub_group_size", 1e9))
    for name, ps in params.items():
        n = sum(p.numel() for p in ps)
        if train_cfgs[name].max_grad_norm and n > size:
            raise ConfigError(f"task {name} has {n:,} trainable elements, more than ZeRO-3's sub_group_size "
                              f"({size:g}), so its gradient cannot be clipped by its own norm; raise "
                              "zero_optimization.sub_group_size in the DeepSpeed config or unset its "
                              "train.max_grad_norm")


def gathered_trainable(acc: Accelerator, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name: full tensor} of ``module``'s trainable parameters, ZeRO-3 shards gathered (every rank must call it;
    only these tensors are gathered, never the frozen LM)."""
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None or int(plugin.zero_stage) != 3:
        return {n: p.detach() for n, p in params}
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        return {n: p.detach().clone() for n, p in params}
