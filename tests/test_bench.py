"""The end-to-end benchmarks run in their CI-sized quick modes (tiny random LMs built from configs) and write their
results: JSON keys, a row for every variant, the markdown report. Timings are not checked."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
MODELS = ["smollm2", "paper-llm"]


def bench(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", "--json", "--rounds", "1",
                           "--warmup", "0", *args], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "self-check passed" in proc.stderr
    return json.loads(proc.stdout)


def test_train_step_quick(tmp_path):
    out = tmp_path / "train_step.md"
    data = bench("train_step.py", "--out", str(out))
    assert set(data) == {"meta", "results", "targets"}
    assert {"command", "torch", "peft", "transformers", "load_start", "load_end", "threads"} <= set(data["meta"])
    assert [r["model"] for r in data["results"]] == MODELS
    want = {("PEFT LoRA", "-"), ("mtcpeft agnostic", "-")} | {
        (f"mtcpeft specific {c} ctx {a}", a) for c in (2, 16) for a in ("spans", "random")}
    for res in data["results"]:
        rows = res["rows"]
        for ckpt in (False, True):
            assert {(r["variant"], r["assign"]) for r in rows if r["checkpointing"] == ckpt} == want
        for r in rows:
            assert r["ms"] > 0 and r["peak_mb"] > 0 and r["trainable"] > 0
            assert {"ratio_peft", "ratio_agnostic", "mem_ratio_peft", "mem_ratio_agnostic", "state_mb"} <= set(r)
        assert {r["trainable"] for r in rows if r["kind"] in ("peft", "agnostic")} == {rows[0]["trainable"]}
    # one target line per non-PEFT variant: agnostic vs PEFT, specific vs agnostic, with and without checkpointing
    assert len(data["targets"]) == len(MODELS) * 2 * 5
    text = out.read_text()
    assert text.startswith("# Training step end to end") and "Command: `python bench/train_step.py --quick" in text
    assert text.count("| mtcpeft specific 16 ctx random |") == len(MODELS) * 2
    assert "<!-- notes:begin" in text and "load average" in text


def test_generate_quick(tmp_path):
    out = tmp_path / "generate.md"
    data = bench("generate.py", "--out", str(out))
    assert set(data) == {"meta", "results", "targets"}
    assert [r["model"] for r in data["results"]] == MODELS
    kinds = {"base", "peft", "agnostic", "specific"}
    for res in data["results"]:
        assert {(r["kind"], r["batch"]) for r in res["rows"]} == {(k, b) for k in kinds for b in (1, 8)}
        assert all(r["tokens_per_s"] > 0 for r in res["rows"])
    assert {(t["model"], t["batch"]) for t in data["targets"]} == {(m, b) for m in MODELS for b in (1, 8)}
    text = out.read_text()
    assert text.startswith("# Cached greedy generation") and text.count("| mtcpeft specific (3 contexts) |") == 4
