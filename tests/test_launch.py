"""The launch scripts as a user runs them: subprocesses, exit codes, files left behind, one-line errors."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides
from tasks import TASKS, get_task

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}


def launch(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def test_train_task_then_generate(tiny_lm_dir, tmp_path):
    out = tmp_path / "run"
    launch("train_task.py", "--task", "caption", *tiny_overrides(tiny_lm_dir, out))
    results = json.loads((out / "results.json").read_text())
    assert results["best_epoch"] in (1, 2) and results["world_size"] == 1
    assert results["history"][0]["epoch"] == 0 and results["history"][-1]["val_ppl"] < results["history"][0]["val_ppl"]
    assert results["data"]["train"]["kept"] == 48
    manifest = json.loads((out / "plugin" / "plugin.json").read_text())
    assert manifest["task"] == "caption" and manifest["contexts"] == ["image", "text"]
    assert (out / "plugin" / "adaptor.safetensors").is_file() and (out / "config.yaml").is_file()

    from mtcpeft.data.easyvqa import easyvqa_captions

    image = easyvqa_captions("val")[0]["image"]
    proc = launch("generate.py", "--plugin", str(out / "plugin"), "--image", image, "--max-new-tokens", "6")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(image)]
    assert len(lines) == 1 and lines[0].split("\t")[1].strip()
    proc = launch("generate.py", "--plugin", str(out / "plugin"), "--image", image, "--beams", "3",
                  "--max-new-tokens", "6")
    assert any(ln.startswith(image) for ln in proc.stdout.splitlines())


@pytest.mark.parametrize("name", TASKS.names())
def test_every_task_trains_then_evaluates(tiny_lm_dir, tmp_path, name):
    """train_task.py then evaluate.py for each registered task: perplexity falls, the plugin's perplexity on the
    validation split equals the trainer's, and the task's generation metric is computed over every prediction."""
    out = tmp_path / name
    data = ["data.seq_len=160", "data.max_target_tokens=8"] if name != "caption" else []
    # fp32 (the offline configs train with bf16 autocast; evaluate.py runs in fp32) so perplexities can be compared
    launch("train_task.py", "--task", name, *tiny_overrides(tiny_lm_dir, out), *data, "train.mixed_precision=no")
    results = json.loads((out / "results.json").read_text())
    hist = results["history"]
    assert min(row["val_ppl"] for row in hist[1:]) < hist[0]["val_ppl"]
    manifest = json.loads((out / "plugin" / "plugin.json").read_text())
    task = get_task(name)
    assert manifest["task"] == name and manifest["contexts"] == list(task.contexts)
    assert (manifest["projector"] is not None) == task.uses_images

    launch("evaluate.py", "--task", name, "--plugin", str(out / "plugin"), "--limit", "16", "--batch-size", "8",
           *[o for o in tiny_overrides(tiny_lm_dir, out) if o.startswith("data.") and "limit" not in o])
    ev = json.loads((out / "eval_val.json").read_text())
    assert ev["perplexity"]["ppl"] == pytest.approx(results["best_val_ppl"], rel=1e-4)
    assert 1 <= ev["predictions"] <= 16 and ev["data"]["kept"] == 16
    assert task.metric in ev["metrics"] and ev["metrics"][task.metric] >= 0
    assert ev["samples"] and all("generated" in s for s in ev["samples"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "nope"], "unknown task 'nope'; known: caption, qa, vqa"),
        (["--task", "caption", "train.lrr=1"], "did you mean 'train.lr'"),
        (["--task", "caption", "adaptor.kind=loha"], "adaptor.kind"),
    ],
)
def test_bad_command_lines_fail_with_one_clear_line(args, message, tmp_path):
    proc = launch("train_task.py", *args, f"output_dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------- every script, one exit path
SCRIPTS = sorted(p.name for p in (ROOT / "launch").glob("*.py") if not p.name.startswith("_"))
# a user error per script, caught before any model is loaded; a new script adds one here
USER_ERRORS = {
    "count_params.py": (["--adaptor", "bitfit", "--rank", "8", "--random-init"], "has no --rank option"),
    "evaluate.py": (["--task", "nope", "--plugin", "{tmp}/none"], "unknown task 'nope'"),
    "export_peft.py": (["--plugin", "{tmp}/none", "--context", "text", "--out", "{tmp}/peft"], "not a plugin directory"),
    "generate.py": (["--plugin", "{tmp}/none", "--image", "x.png"], "not a plugin directory"),
    "heatmap.py": (["--plugin", "{tmp}/none", "--image", "README.md", "--text", "a", "--span", "a", "--layer", "0"],
                   "not a plugin directory"),
    "merge.py": (["--plugin", "a={tmp}/none", "--out", "{tmp}/merged"], "not a plugin directory"),
    "sweep.py": (["--config", "{tmp}/none.yaml"], "does not exist"),
    "train_fused.py": (["--tasks", "nope,qa", "--out", "{tmp}/fused"], "unknown task 'nope'"),
    "train_joint.py": (["--plugin", "{tmp}/none", "--tasks", "nope", "output_dir={tmp}/run"], "unknown task 'nope'"),
    "train_parallel.py": (["--tasks", "nope", "--out", "{tmp}/parallel"], "unknown task 'nope'"),
    "train_task.py": (["--task", "caption", "train.lrr=1", "output_dir={tmp}/run"], "did you mean 'train.lr'"),
}


def test_every_script_has_a_user_error_case():
    assert sorted(USER_ERRORS) == SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_exits_2_with_one_error_line_on_a_user_error(script, tmp_path):
    args, message = USER_ERRORS[script]
    proc = launch(script, *[a.format(tmp=tmp_path) for a in args], check=False)
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_reaches_the_library_as_an_installed_package_and_exits_through_run_cli(script):
    tree = ast.parse((ROOT / "launch" / script).read_text())
    touches_path = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path"
                    and isinstance(n.value, ast.Name) and n.value.id == "sys"]
    assert not touches_path, f"{script} changes sys.path (lines {touches_path}); the package is installed"
    main_blocks = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "__name__ == '__main__'"]
    assert [ast.unparse(n.body[0]) for n in main_blocks] == ["import _require_mtcpeft", "run_cli(main)"]


def test_without_the_package_installed_a_script_says_how_to_install_it(tmp_path):
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-S", str(ROOT / "launch" / "train_task.py"), "--task", "caption"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)  # -S: no site-packages
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("error:") == 1 and "not installed" in proc.stderr and "pip install -e ." in proc.stderr


# --------------------------------------------------------------------------------- a task of a user's package
@pytest.mark.slow
def test_a_task_of_a_user_package_trains_through_train_task(tiny_lm_dir, tmp_path):
    """A task defined in a package on disk (not in tasks/) is imported by --task-module, trains for two steps
    through launch/train_task.py, and its plugin names it; without the flag the name is unknown and the error
    says how to register it."""
    from support.user_task import write_user_task

    module = write_user_task(tmp_path / "site", "mtcpeft_user_pkg_c", "user_qa")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path / "site")])}
    out = tmp_path / "run"
    args = [*tiny_overrides(tiny_lm_dir, out), "data.train_limit=16", "data.val_limit=8", "train.max_steps=2",
            "data.seq_len=96", "data.max_target_tokens=8"]
    cmd = [sys.executable, str(ROOT / "launch" / "train_task.py"), "--task", "user_qa", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 2 and "unknown task 'user_qa'; known: caption, qa, vqa" in proc.stderr
    assert "--task-module" in proc.stderr
    proc = subprocess.run(cmd + ["--task-module", module], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "user_qa" and results["global_step"] == 2
    manifest = json.loads((out / "plugin" / "plugin.json").read_text())
    assert manifest["task"] == "user_qa" and manifest["contexts"] == ["prompt", "reply"]
    assert manifest["projector"] is None  # a text task: no encoder, no projector
