"""Which precision a run trains in: ``train.mixed_precision=auto`` (the default) asks the hardware.

bf16 autocast pays off only where the hardware multiplies bf16 natively: on a CPU without the avx512_bf16 or
AMX-BF16 instructions (or Arm's bf16 extension) every bf16 matmul is emulated through fp32 conversions, and on one
of this project's machines (Xeon, avx512bw/vnni, no avx512_bf16) a caption step took 13.7 s in bf16 against 6.0 s
in fp32. So ``auto`` picks bf16 on a CUDA GPU that supports it and on CPUs that list a native bf16 instruction,
fp32 ("no") everywhere else, and says why.
"""
from __future__ import annotations

from pathlib import Path

import torch

CHOICES = ("auto", "no", "fp16", "bf16")
# /proc/cpuinfo flags (x86 "flags", Arm "Features") that mean native bf16 arithmetic
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of this machine (Linux /proc/cpuinfo; empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def resolve_precision(requested: str, *, cuda: bool | None = None, cuda_bf16: bool | None = None,
                      flags: set[str] | None = None) -> tuple[str, str]:
    """(accelerate's ``mixed_precision`` value, the reason) for a requested ``train.mixed_precision``.

    Explicit values pass through; ``auto`` looks at the device (arguments override the detection, for tests).
    """
    if requested != "auto":
        return requested, f"train.mixed_precision={requested}"
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        bf16 = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        return ("bf16", "auto: this GPU supports bf16") if bf16 else ("no", "auto: this GPU has no bf16 support")
    native = sorted(set(NATIVE_BF16_FLAGS) & (cpu_flags() if flags is None else flags))
    if native:
        return "bf16", f"auto: this CPU multiplies bf16 natively ({', '.join(native)})"
    return "no", ("auto: fp32, this CPU has no native bf16 instructions (avx512_bf16 / amx_bf16), where bf16 "
                  "autocast runs slower than fp32")
