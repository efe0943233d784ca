"""A battery of bad inputs: every user mistake ends in exit status 2 and one ``error: ...`` line that names the
problem (split, counts, file, line), never a traceback; bad data the README promises to skip is skipped and counted.
The launch scripts run in-process through :func:`mtcpeft.cli.run_cli`, as ``python launch/<script>.py`` runs them."""
import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import tiny_overrides
from mtcpeft.cli import run_cli
from mtcpeft.config import ConfigError, load_config, save_config
from mtcpeft.data.dataset import BadImageError, check_images
from mtcpeft.training.build import build_task_model, read_examples, task_plugin
from tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures"
CAPTIONS = ["a red circle.", "a blue rectangle.", "a green triangle.", "a yellow circle."]


def launch_module(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fails(script: str, args: list[str], capsys) -> str:
    """Run a launch script's main as its __main__ does; assert exit status 2 and exactly one stderr line
    ``error: ...`` (progress bars aside) and no traceback; return that line."""
    main = launch_module(script).main
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: main(args))
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith(("error:", "usage:")) or ": error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def write_jpeg(path: Path, color=(200, 30, 30), truncate: bool = False) -> Path:
    """A real 64x64 JPEG (noisy, so its entropy-coded data are long); ``truncate`` cuts its bytes in half."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.clip(np.random.default_rng(0).normal(color, 40, (64, 64, 3)), 0, 255).astype("uint8")
    Image.fromarray(pixels).save(path, quality=95)
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


def coco_set(root: Path, split: str, n: int, captions=CAPTIONS, truncated=(), images: bool = True) -> Path:
    """An official-format COCO captions file with ``n`` images (one caption each) under ``root/<split>2017``."""
    folder = root / f"{split}2017"
    doc = {"images": [], "annotations": []}
    for i in range(n):
        name = f"{i + 1:012d}.jpg"
        if images:
            write_jpeg(folder / name, (40 * i % 255, 100, 200), truncate=i in truncated)
        doc["images"].append({"id": i + 1, "file_name": name})
        doc["annotations"].append({"id": 100 + i, "image_id": i + 1, "caption": captions[i % len(captions)]})
    path = root / f"captions_{split}2017.json"
    path.write_text(json.dumps(doc))
    return path


def tiny(lm_dir: str, out: Path) -> list[str]:
    """A seconds-long run; fp32, as every in-process run of this session (accelerate keeps one precision)."""
    return [*tiny_overrides(lm_dir, out), "train.mixed_precision=no"]


def coco_overrides(root: Path, train: Path, val: Path) -> list[str]:
    return ["data.source=coco", f"data.annotations={train}", f"data.val_annotations={val}",
            f"data.images={root / 'train2017'}", f"data.val_images={root / 'val2017'}"]


# ------------------------------------------------------------------------------------ splits with no examples
def test_caption_split_whose_images_are_all_missing_names_split_and_counts(tiny_lm_dir, tmp_path, capsys):
    train = coco_set(tmp_path, "train", 4, images=False)
    (tmp_path / "train2017").mkdir()  # the folder exists, its images do not
    val = coco_set(tmp_path, "val", 2)
    line = fails("train_task", ["--task", "caption", *tiny(tiny_lm_dir, tmp_path / "run"),
                                *coco_overrides(tmp_path, train, val)], capsys)
    assert "caption train split" in line and "no usable examples" in line
    assert "4 examples read; 4 unreadable images" in line
    assert "000000000001.jpg" in line  # an example of what is wrong


def test_caption_image_folder_missing_names_the_key(tmp_path):
    train, val = coco_set(tmp_path, "train", 2, images=False), coco_set(tmp_path, "val", 2, images=False)
    cfg = load_config(None, coco_overrides(tmp_path, train, val))
    with pytest.raises(ConfigError, match=r"data.images=.*train2017 is not a folder"):
        read_examples(cfg, get_task("caption"), "train")


def test_all_captions_empty(tiny_lm_dir, tmp_path):
    from mtcpeft.training.build import build_datasets
    from mtcpeft.data.dataset import EmptySplitError
    from mtcpeft.data.task import SequenceLayout
    from support.tokenizer import make_tokenizer

    train = coco_set(tmp_path, "train", 3, captions=["", "  ", ""])
    val = coco_set(tmp_path, "val", 2)
    cfg = load_config(None, coco_overrides(tmp_path, train, val))
    tok = make_tokenizer(tmp_path / "tok")
    with pytest.raises(EmptySplitError, match=r"caption train split .*: 3 examples read; 3 empty targets"):
        build_datasets(cfg, get_task("caption"), None, tok, SequenceLayout(4, 32, 8), splits=("train",),
                       progress=False)


def test_a_prompt_too_long_for_the_layout_is_skipped_and_counted(tmp_path):
    from mtcpeft.training.build import build_datasets
    from mtcpeft.data.task import SequenceLayout
    from support.tokenizer import make_tokenizer

    doc = json.loads((FIX / "squad_v1_mini.json").read_text())
    doc["data"][0]["paragraphs"][0]["qas"][0]["question"] = "what color is the shape? " * 40
    path = tmp_path / "train.json"
    path.write_text(json.dumps(doc))
    cfg = load_config(None, ["data.source=squad", f"data.annotations={path}", "data.seq_len=100",
                             "data.max_target_tokens=8"])
    ds, report = build_datasets(cfg, get_task("qa"), None, make_tokenizer(tmp_path / "tok"),
                                SequenceLayout(0, 100, 8), splits=("train",), progress=False)["train"]
    assert (report.examples, report.too_long, report.kept, len(ds)) == (5, 1, 4, 4)
    assert "1 prompts too long for data.seq_len skipped" in report.summary("train")


def _squad_all_misplaced(tmp_path: Path) -> Path:
    doc = json.loads((FIX / "squad_v1_mini.json").read_text())
    for art in doc["data"]:
        for para in art["paragraphs"]:
            for qa in para["qas"]:
                for a in qa["answers"]:
                    a["answer_start"] += 1  # every answer off its offset
    path = tmp_path / "train-v1.1.json"
    path.write_text(json.dumps(doc))
    return path


def test_qa_split_whose_answers_are_all_off_their_offset(tiny_lm_dir, tmp_path, capsys):
    bad = _squad_all_misplaced(tmp_path)
    line = fails("train_task", ["--task", "qa", *tiny(tiny_lm_dir, tmp_path / "run"), "data.seq_len=160",
                                "data.max_target_tokens=8", "data.source=squad", f"data.annotations={bad}",
                                f"data.val_annotations={FIX / 'squad_v1_mini.json'}"], capsys)
    assert "qa train split" in line and "no usable examples" in line and "not at answer_start" in line
    assert str(bad) in line


def _vqa2_files(root: Path, subtype: str, images: bool = True, annotated: bool = True) -> dict[str, Path]:
    """VQA v2 files under their released names: v2_OpenEnded_mscoco_<subtype>_questions.json,
    v2_mscoco_<subtype>_annotations.json and <subtype>/COCO_<subtype>_<12-digit id>.jpg."""
    qs = json.loads((FIX / "vqa2_mini_questions.json").read_text())
    anns = json.loads((FIX / "vqa2_mini_annotations.json").read_text())
    qs["data_subtype"] = anns["data_subtype"] = subtype
    if not annotated:
        anns["annotations"] = []
    q, a = root / f"v2_OpenEnded_mscoco_{subtype}_questions.json", root / f"v2_mscoco_{subtype}_annotations.json"
    q.write_text(json.dumps(qs))
    a.write_text(json.dumps(anns))
    folder = root / subtype
    folder.mkdir(parents=True, exist_ok=True)
    if images:
        for image_id in {x["image_id"] for x in qs["questions"]}:
            write_jpeg(folder / f"COCO_{subtype}_{image_id:012d}.jpg")
    return {"questions": q, "annotations": a, "images": folder}


def vqa2_overrides(train: dict, val: dict) -> list[str]:
    """The overrides configs/vqa_offline.yaml documents: data.source=vqa2 data.questions=... data.annotations=...
    data.images=... (and val_*)."""
    return ["data.source=vqa2", *[f"data.{k}={v}" for k, v in train.items()],
            *[f"data.val_{k}={v}" for k, v in val.items()]]


def test_vqa_split_whose_questions_have_no_annotations(tiny_lm_dir, tmp_path, capsys):
    train = _vqa2_files(tmp_path, "train2014", annotated=False)
    val = _vqa2_files(tmp_path, "val2014")
    line = fails("train_task", ["--task", "vqa", *tiny(tiny_lm_dir, tmp_path / "run"), "data.seq_len=160",
                                "data.max_target_tokens=8", *vqa2_overrides(train, val)], capsys)
    assert "vqa train split" in line and "0 of 3 questions kept" in line and "3 without an annotation" in line


def test_joint_route_names_the_task_and_split(tiny_lm_dir, tmp_path, capsys):
    from support.joint import joint_overrides, unified_plugin

    plugin = unified_plugin(tiny_lm_dir, tmp_path / "plugins")
    data = tmp_path / "qa_data.yaml"
    data.write_text(f"data:\n  source: squad\n  annotations: {_squad_all_misplaced(tmp_path)}\n"
                    f"  val_annotations: {FIX / 'squad_v1_mini.json'}\n")
    line = fails("train_joint", ["--plugin", str(plugin), "--tasks", "qa", "--data", f"qa={data}",
                                 *joint_overrides(tmp_path / "joint")], capsys)
    assert "qa train split" in line and "no usable examples" in line


# ------------------------------------------------------------------------------------------- truncated JPEG
def test_truncated_jpeg_is_found_by_the_check(tmp_path):
    good, cut = write_jpeg(tmp_path / "good.jpg"), write_jpeg(tmp_path / "cut.jpg", truncate=True)
    with Image.open(cut) as im:
        im.verify()  # what the old check did: a truncated JPEG passes it
    assert check_images([str(good), str(cut)], "skip", progress=False) == {str(cut)}
    with pytest.raises(BadImageError, match=r"cut.jpg.*truncated"):
        check_images([str(good), str(cut)], "fail", progress=False)


def test_training_skips_and_counts_a_truncated_jpeg(tiny_lm_dir, tmp_path):
    train = coco_set(tmp_path, "train", 4, truncated=(2,))
    val = coco_set(tmp_path, "val", 2)
    results = launch_module("train_task").main(
        ["--task", "caption", *tiny(tiny_lm_dir, tmp_path / "run"), *coco_overrides(tmp_path, train, val),
         "train.epochs=1", "train.max_steps=1"])
    assert results["data"]["train"]["bad_images"] == 1 and results["data"]["train"]["kept"] == 3


# ---------------------------------------------------------------------------------------------------- VQA v2
def test_vqa2_with_released_file_names_and_the_documented_overrides(tmp_path):
    train, val = _vqa2_files(tmp_path, "train2014"), _vqa2_files(tmp_path, "val2014")
    cfg = load_config(ROOT / "configs" / "vqa_offline.yaml", vqa2_overrides(train, val))
    task = get_task("vqa")
    ex = read_examples(cfg, task, "train")
    assert ex[0]["image"] == str(tmp_path / "train2014" / "COCO_train2014_000000000042.jpg")
    assert all(Path(e["image"]).is_file() for e in ex)
    assert read_examples(cfg, task, "val")[0]["image"] == str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")


def test_vqa2_old_split_pattern_still_reads(tmp_path):
    """Configs saved with the old default ``COCO_{split}_...`` pattern keep working ({split} = the subtype)."""
    train, val = _vqa2_files(tmp_path, "train2014"), _vqa2_files(tmp_path, "val2014")
    cfg = load_config(None, [*vqa2_overrides(train, val), "data.image_pattern=COCO_{split}_{image_id:012d}.jpg"])
    assert Path(read_examples(cfg, get_task("vqa"), "train")[0]["image"]).is_file()


# ---------------------------------------------------------------------------------------------------- configs
def test_missing_config_file_is_one_line(tmp_path, capsys):
    line = fails("train_task", ["--task", "caption", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert "nope.yaml" in line and "does not exist" in line


def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: caption\ntrain:\n  lr: [1.0e-3, 2\n  epochs: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and "line 4" in msg and "column" in msg
    line = fails("train_task", ["--task", "caption", "--config", str(bad)], capsys)
    assert "bad.yaml" in line and "line 4" in line


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary", b"- just\n- a list\n"])
def test_config_that_is_not_text_or_not_a_mapping(tmp_path, content):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


# ----------------------------------------------------------------------------- evaluate: the plugin's own data
def _coco_plugin(lm_dir: str, root: Path) -> tuple[Path, Path]:
    """A caption plugin built (untrained) on a COCO-format set, as train_task.py leaves it: run config + plugin."""
    train, val = coco_set(root, "train", 4), coco_set(root, "val", 3)
    cfg = load_config(None, [*tiny_overrides(lm_dir, root / "run"), *coco_overrides(root, train, val)])
    model, _, _ = build_task_model(cfg, get_task("caption"))
    save_config(cfg, root / "run" / "config.yaml")
    return task_plugin(model, cfg, get_task("caption"), root / "run" / "plugin"), val


def test_evaluate_defaults_to_the_data_the_plugin_was_trained_on(tiny_lm_dir, tmp_path, capsys):
    plugin, val = _coco_plugin(tiny_lm_dir, tmp_path)
    capsys.readouterr()
    result = launch_module("evaluate").main(["--task", "caption", "--plugin", str(plugin), "--batch-size", "4"])
    out = capsys.readouterr().out
    assert "evaluating on data.source=coco val" in out and str(val) in out
    assert result["data"]["examples"] == 3 and all(s["image"].startswith(str(tmp_path / "val2017"))
                                                   for s in result["samples"])


def test_evaluate_reads_the_run_config_of_an_older_plugin(tiny_lm_dir, tmp_path, capsys):
    plugin, val = _coco_plugin(tiny_lm_dir, tmp_path)
    manifest = json.loads((plugin / "plugin.json").read_text())
    manifest.pop("data")  # written before plugins recorded their data
    (plugin / "plugin.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    result = launch_module("evaluate").main(["--task", "caption", "--plugin", str(plugin), "--limit", "2"])
    out = capsys.readouterr().out
    assert "evaluating on data.source=coco val" in out and "config.yaml" in out and result["data"]["examples"] == 2


# ------------------------------------------------------------------------------- launch scripts' other inputs
@pytest.fixture(scope="module")
def cli_plugin(tiny_lm_dir, tmp_path_factory) -> Path:
    """One untrained caption plugin shared by the command-line tests that need a valid plugin."""
    return _coco_plugin(tiny_lm_dir, tmp_path_factory.mktemp("cli_plugin"))[0]


def test_generate_with_a_missing_image_or_bad_plugin(cli_plugin, tmp_path, capsys):
    line = fails("generate", ["--plugin", str(cli_plugin), "--image", str(tmp_path / "none.png")], capsys)
    assert "none.png" in line and "does not exist" in line
    cut = write_jpeg(tmp_path / "cut.jpg", truncate=True)
    line = fails("generate", ["--plugin", str(cli_plugin), "--image", str(cut)], capsys)
    assert "cut.jpg" in line and "truncated" in line
    line = fails("generate", ["--plugin", str(tmp_path / "nowhere"), "--image", str(cut)], capsys)
    assert "nowhere" in line and "not a plugin directory" in line
    line = fails("generate", ["--plugin", str(cli_plugin), "--image", str(write_jpeg(tmp_path / "ok.jpg")),
                              "--question", "what shape?"], capsys)
    assert "caption plugin reads no --question" in line


def _not_json(tmp_path):
    p = tmp_path / "captions.json"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff binary, not JSON")
    return p


def _coco_missing_key(tmp_path):
    p = tmp_path / "captions.json"
    p.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}]}))
    return p


def _coco_images_not_a_list(tmp_path):
    p = tmp_path / "captions.json"
    p.write_text(json.dumps({"images": 7, "annotations": []}))
    return p


def _coco_caption_not_text(tmp_path):
    p = tmp_path / "captions.json"
    p.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                             "annotations": [{"id": 1, "image_id": 1, "caption": 5}]}))
    return p


def coco_files(path: Path) -> list[str]:
    """``path`` as both COCO caption files (so that the old default data would reach the reader too)."""
    return ["data.source=coco", f"data.annotations={path}", f"data.val_annotations={path}",
            f"data.images={path.parent}"]


@pytest.mark.parametrize("args, expect", [
    (lambda p, t: ["--task", "nope", "--plugin", str(p)], "unknown task 'nope'"),
    (lambda p, t: ["--task", "caption", "--plugin", str(t / "missing")], "not a plugin directory"),
    (lambda p, t: ["--task", "qa", "--plugin", str(p)], "is a 'caption' plugin"),
    (lambda p, t: ["--task", "caption", "--plugin", str(p), *coco_files(_not_json(t))], "is not valid JSON"),
    (lambda p, t: ["--task", "caption", "--plugin", str(p), *coco_files(_coco_missing_key(t))],
     "missing field 'annotations'"),
    (lambda p, t: ["--task", "caption", "--plugin", str(p), *coco_files(_coco_images_not_a_list(t))],
     "'images' should be list"),
    (lambda p, t: ["--task", "caption", "--plugin", str(p), *coco_files(_coco_caption_not_text(t))],
     "'caption' should be str"),
    (lambda p, t: ["--task", "caption", "--plugin", str(p), "--limit", "0"], "--limit"),
    (lambda p, t: ["--task", "caption", "--plugin", str(p), "--batch-size", "-1"], "--batch-size"),
], ids=["unknown-task", "no-plugin", "wrong-task", "not-json", "missing-key", "images-not-list",
        "caption-not-text", "limit-0", "batch-size-negative"])
def test_evaluate_bad_inputs(cli_plugin, tmp_path, capsys, args, expect):
    argv = args(cli_plugin, tmp_path)
    main = launch_module("evaluate").main
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err and expect in err.strip().splitlines()[-1], err
