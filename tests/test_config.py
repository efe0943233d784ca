"""Config loading: defaults, YAML + dotted overrides, type checks, helpful errors, round trip, every shipped YAML."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from mtcpeft.config import (
    AdaptorSpec, ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig, config_to_dict, flat_config,
    load_config, save_config,
)

ROOT = Path(__file__).resolve().parents[1]
# run configs (RunConfig YAML); accelerate configs, sweep specs and merge specs have their own formats and tests
RUN_CONFIGS = sorted(p for p in ROOT.glob("configs/**/*.yaml")
                     if not {"accelerate", "sweeps"} & set(p.parts) and not p.name.startswith("merge_"))
ACCELERATE_CONFIGS = sorted(ROOT.glob("configs/accelerate/*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_validate():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.train.betas == (0.9, 0.95) and cfg.adaptor.kind == "lora" and cfg.data.source == "easyvqa"


def test_yaml_and_overrides_apply_with_types(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-3\n  epochs: 3\ndata:\n  train_limit: 50\n")
    cfg = load_config(path, ["train.lr=3e-4", "train.betas=[0.8,0.9]", "data.train_limit=null",
                             "model.gradient_checkpointing=true", "adaptor.kind=bitfit", "adaptor.alpha=16",
                             "output_dir=2024"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # PyYAML reads "3e-4" as a string
    assert cfg.train.epochs == 3  # from the file
    assert cfg.train.betas == (0.8, 0.9) and isinstance(cfg.train.betas, tuple)
    assert cfg.data.train_limit is None
    assert cfg.model.gradient_checkpointing is True
    assert cfg.adaptor.kind == "bitfit"
    assert cfg.adaptor.alpha == 16.0 and isinstance(cfg.adaptor.alpha, float)  # int accepted for float
    assert cfg.output_dir == "2024"  # a string field keeps the override's text


def test_empty_section_and_override_into_it(tmp_path):
    path = write(tmp_path, "train:\ndata:\n  seq_len: 100\n")
    cfg = load_config(path, ["train.epochs=2"])
    assert cfg.train == TrainConfig(epochs=2) and cfg.data.seq_len == 100


def test_later_override_wins():
    assert load_config(None, ["train.epochs=2", "train.epochs=5"]).train.epochs == 5


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
    (["lr=1"], "did you mean 'train.lr'?"),  # right key, wrong section
    (["trian.lr=1"], "did you mean 'train'?"),
    (["model.visoin=resnet18"], "keys of model: lm, vision,"),
])
def test_unknown_override_key_suggests(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace(".", r"\.")):
        load_config(None, overrides)


def test_unknown_yaml_key_suggests(tmp_path):
    path = write(tmp_path, "train:\n  batch_szie: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "'train.batch_szie'; did you mean 'train.batch_size'?" in str(e.value)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("override, expected", [
    ("train.lr=abc", "'train.lr' expects float, got str 'abc'"),
    ("train.epochs=1.5", "'train.epochs' expects int, got float 1.5"),
    ("train.resume=1", "'train.resume' expects bool"),
    ("train.betas=[0.9]", "'train.betas' expects tuple[float, float]"),
    ("data.val_limit=many", "'data.val_limit' expects int | None"),
    ("seed=true", "'seed' expects int, got bool True"),
])
def test_wrong_type_names_key_type_and_value(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("|", r"\|")):
        load_config(None, [override])


def test_unquoted_yaml_no_for_a_string_says_quote_it(tmp_path):
    with pytest.raises(ConfigError, match="'train.mixed_precision' expects str, got bool False; quote it"):
        load_config(write(tmp_path, "train:\n  mixed_precision: no\n"))


def test_section_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(write(tmp_path, "train: 3\n"))


@pytest.mark.parametrize("override", ["train.lr", "=3", "train.lr 3e-4"])
def test_override_without_equals_shows_form(override):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, [override])


@pytest.mark.parametrize("override, key", [
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("data.source=imagenet", "data.source"),
    ("data.on_bad_image=ignore", "data.on_bad_image"),
    ("model.projector=conv", "model.projector"),
    ("adaptor.kind=lorra", "adaptor.kind"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.epochs=0", "train.epochs"),
    ("train.lr=0", "train.lr"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("data.seq_len=63", "data.seq_len"),
    ("model.projector_dropout=1.0", "model.projector_dropout"),
    ("model.residual_dropout=-0.1", "model.residual_dropout"),
    ("adaptor.dropout=1", "adaptor.dropout"),
    ("data.source=karpathy", "data.karpathy_json"),  # a source without its paths
])
def test_bad_values_raise_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(None, [override])


def test_enum_message_lists_choices():
    with pytest.raises(ConfigError, match="must be one of 'auto', 'no', 'fp16', 'bf16', got 'fp8'"):
        load_config(None, ["train.mixed_precision=fp8"])
    with pytest.raises(ConfigError, match="'lora'.*'full'"):
        load_config(None, ["adaptor.kind=lorra"])


def test_full_finetuning_is_a_training_mode_not_an_adaptor_kind():
    cfg = load_config(None, ["train.mode=full", "adaptor.kind=none"])
    assert (cfg.train.mode, cfg.adaptor.kind) == ("full", "none")
    assert load_config(None).train.mode == "adaptors"
    # the old spelling names the new one
    with pytest.raises(ConfigError, match=r"config key 'adaptor.kind' must be one of .* set train.mode='full' with "
                                          r"adaptor.kind='none'.*got 'full'"):
        load_config(None, ["adaptor.kind=full"])
    with pytest.raises(ConfigError, match=r"'train.mode' is 'full' .* adaptor.kind is 'lora'; set adaptor.kind=none"):
        load_config(None, ["train.mode=full"])
    with pytest.raises(ConfigError, match=r"config key 'train.mode' must be one of 'adaptors', 'full'"):
        load_config(None, ["train.mode=frozen"])


def test_adaptor_spec_builds_the_kind_from_the_options_it_declares():
    from mtcpeft.core.adaptors import BitFitConfig, LoRAConfig

    spec = load_config(None, ["adaptor.rank=4", "adaptor.alpha=2", "adaptor.dropout=0.1"]).adaptor
    assert spec.build() == LoRAConfig(rank=4, alpha=2.0, dropout=0.1)
    assert load_config(None, ["adaptor.kind=bitfit", "adaptor.rank=4"]).adaptor.build() == BitFitConfig()
    spec.set_options({"rank": 16, "alpha": 32.0})
    assert (spec.rank, spec.alpha) == (16, 32.0)
    with pytest.raises(ConfigError, match=r"adaptor options \['gate'\] have no key in the adaptor section"):
        spec.set_options({"gate": 1.0})


def test_vision_pretrained_accepts_a_path():
    assert load_config(None, ["model.vision_pretrained=ckpt/enc.safetensors"]).model.vision_pretrained \
        == "ckpt/enc.safetensors"


def test_direct_construction_runs_checks():
    with pytest.raises(ConfigError, match="'batch_size'"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError):
        AdaptorSpec(kind="nope")
    assert ModelConfig() and DataConfig(source="coco", annotations="a.json", images="imgs")


def test_save_load_round_trip(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "train.betas=[0.8,0.99]", "data.train_limit=7", "adaptor.kind=ia3",
                             "model.image_size=160", "data.source=coco", "data.annotations=a.json", "data.images=i"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text()) == config_to_dict(cfg)
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_flat_config_has_dotted_keys():
    flat = flat_config(load_config(None, ["train.lr=3e-4"]))
    assert flat["train.lr"] == 3e-4 and flat["train.betas"] == [0.9, 0.95] and flat["task"] == "caption"
    assert len(flat) == len([k for k in flat if "." in k]) + 3  # task, output_dir, seed at the top level
    assert flat_config({"a": {"b": {"c": 1}}, "d": None}) == {"a.b.c": 1, "d": None}


@dataclass
class Inner:  # module level: annotations are strings here and must resolve in the module's namespace
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    scale: float | None = None
    sizes: tuple[int, ...] = ()


def test_custom_dataclass():
    cfg = load_config(None, ["inner.names=[a, b]", "scale=2"], cls=Outer)
    assert cfg == Outer(Inner(["a", "b"]), 2.0)
    assert load_config(None, ["sizes=[1, 2, 3]"], cls=Outer).sizes == (1, 2, 3)
    with pytest.raises(ConfigError, match=r"'sizes\[1\]' expects int, got str 'x'"):
        load_config(None, ["sizes=[1, x]"], cls=Outer)
    with pytest.raises(ConfigError, match=r"'inner.names\[0\]' expects str, got int 3"):
        load_config(None, ["inner.names=[3]"], cls=Outer)


def test_shipped_configs_found():
    assert any(p.name == "caption_offline.yaml" for p in RUN_CONFIGS)
    assert len([p for p in RUN_CONFIGS if p.parent.name == "paper"]) == 10
    assert {p.name for p in ACCELERATE_CONFIGS} >= {"ddp.yaml", "zero2.yaml", "zero3.yaml"}


@pytest.mark.parametrize("path", RUN_CONFIGS + ACCELERATE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_opens_with_its_command(path):
    head = "".join(path.read_text().splitlines(keepends=True)[:15])
    assert head.startswith("#"), f"{path} must open with a comment block"
    assert "launch/" in head or "accelerate launch" in head, f"{path}: its first lines must give the command"


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_run_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert load_config(path, ["train.epochs=1"]).train.epochs == 1
    if path.parent.name == "paper":
        assert cfg.data.source == "karpathy" and cfg.model.lm == "facebook/opt-125m"
        assert (cfg.data.seq_len, cfg.data.max_target_tokens, cfg.train.batch_size) == (128, 63, 96)
        assert cfg.model.vision.startswith("swinv2_") and cfg.model.image_size == 256
        assert cfg.train.betas == (0.9, 0.95) and cfg.train.lr == 1e-4 and cfg.train.mixed_precision == "bf16"
        # full fine-tuning is a training mode (train.mode), not an adaptor kind
        expected = {"lora": ("lora", "adaptors"), "bitfit": ("bitfit", "adaptors"), "ia3": ("ia3", "adaptors"),
                    "full": ("none", "full"), "frozen": ("none", "adaptors")}
        assert (cfg.adaptor.kind, cfg.train.mode) == expected[path.stem.rsplit("_", 1)[-1]]


@pytest.mark.parametrize("name, distributed_type, zero_stage", [
    ("ddp.yaml", "MULTI_GPU", None), ("zero2.yaml", "DEEPSPEED", 2), ("zero3.yaml", "DEEPSPEED", 3),
])
def test_accelerate_configs(name, distributed_type, zero_stage):
    path = ROOT / "configs" / "accelerate" / name
    raw = yaml.safe_load(path.read_text())
    assert raw["compute_environment"] == "LOCAL_MACHINE"
    assert raw["distributed_type"] == distributed_type and raw["num_processes"] == 2
    assert raw["mixed_precision"] == "no"
    if zero_stage is not None:
        ds = raw["deepspeed_config"]
        assert ds["zero_stage"] == zero_stage and ds["gradient_accumulation_steps"] == 1
        assert ds["offload_optimizer_device"] == ds["offload_param_device"] == "none"
        assert ds["zero3_init_flag"] is False

    config_args = pytest.importorskip("accelerate.commands.config.config_args")
    parsed = config_args.load_config_from_file(str(path))  # accelerate's own reader refuses unknown keys
    assert parsed.distributed_type.value == distributed_type and parsed.num_processes == 2
