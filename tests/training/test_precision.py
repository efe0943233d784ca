"""train.mixed_precision=auto: bf16 only where the hardware does bf16 natively, fp32 elsewhere, with the reason."""
import pytest

from mtcpeft.config import ConfigError, load_config
from mtcpeft.training.precision import cpu_flags, resolve_precision

XEON_NO_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON3 = "Features\t: fp asimd sve bf16 i8mm\n"


def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo():
    assert {"avx512bw", "avx512_vnni"} <= cpu_flags(XEON_NO_BF16) and "avx512_bf16" not in cpu_flags(XEON_NO_BF16)
    assert "bf16" in cpu_flags(GRAVITON3)


@pytest.mark.parametrize("cpuinfo, want", [(XEON_NO_BF16, "no"), (SAPPHIRE_RAPIDS, "bf16"), (GRAVITON3, "bf16"),
                                           ("", "no")])
def test_auto_on_cpu_follows_native_bf16(cpuinfo, want):
    precision, why = resolve_precision("auto", cuda=False, flags=cpu_flags(cpuinfo))
    assert precision == want
    assert why.startswith("auto") and (("natively" in why) == (want == "bf16"))


@pytest.mark.parametrize("bf16, want", [(True, "bf16"), (False, "no")])
def test_auto_on_gpu_follows_bf16_support(bf16, want):
    assert resolve_precision("auto", cuda=True, cuda_bf16=bf16, flags=set())[0] == want


@pytest.mark.parametrize("explicit", ["no", "fp16", "bf16"])
def test_explicit_choices_pass_through(explicit):
    assert resolve_precision(explicit, cuda=False, flags={"amx_bf16"})[0] == explicit


def test_auto_is_the_default_and_typos_are_refused():
    assert load_config(None).train.mixed_precision == "auto"
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(None, ["train.mixed_precision=bf17"])
