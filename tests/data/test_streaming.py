"""``data.streaming=true``: a ``datasets`` split read as a stream gives, item for item, what the map-style ``hf`` source
gives for the same files (captions with images, QA, VQA); unreadable images are skipped and counted when read;
shuffling is seeded and reshuffled per epoch; the per-process parts are disjoint and cover the split; a stream's
position restores exactly without shuffling, and with a shuffle buffer as precisely documented; config refusals."""
import datasets
import pytest
import torch

from mtcpeft.config import ConfigError, load_config
from mtcpeft.data.task import get_task
from mtcpeft.training.build import build_datasets, build_task_model
from mtcpeft.training.streams import build_train_stream
from support.runs import tiny_run_config
from support.streams import caption_parquets, qa_parquets, vqa_imagefolder

STREAM = ["data.source=hf", "data.train_limit=null", "data.hf_val_split=train", "data.val_limit=4",
          "data.seq_len=96", "data.cache_features=false"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def _setup(lm_dir, tmp_path, task_name, folder, *overrides):
    cfg = tiny_run_config(lm_dir, tmp_path / "run", f"task={task_name}", *STREAM, f"data.hf_path={folder}",
                          "data.streaming=true", "train.max_steps=2", *overrides)
    task = get_task(task_name)
    torch.manual_seed(0)
    model, tok, layout = build_task_model(cfg, task)
    return cfg, task, model, tok, layout


def _items(ds) -> list[dict]:
    return [{k: v.clone() for k, v in item.items()} for item in ds]


def _assert_same_items(streamed: list[dict], reference) -> None:
    assert len(streamed) == len(reference)
    for i, item in enumerate(streamed):
        want = reference[i]
        assert set(item) == set(want), i
        for k in want:
            assert torch.equal(item[k], want[k]), (i, k)


@pytest.mark.parametrize("task_name, make", [("caption", caption_parquets), ("qa", qa_parquets),
                                             ("vqa", vqa_imagefolder)])
def test_stream_items_equal_the_map_style_items(tiny_lm_dir, tmp_path, task_name, make):
    folder = make(tmp_path)
    cfg, task, model, tok, layout = _setup(tiny_lm_dir, tmp_path, task_name, folder, "data.shuffle_buffer=0")
    stream = build_train_stream(cfg, task, model, tok, layout)
    streamed = _items(stream.epoch(0))
    cfg.data.streaming = False
    reference, report = build_datasets(cfg, task, model, tok, layout, splits=("train",), progress=False)["train"]
    _assert_same_items(streamed, reference)
    assert stream.report.kept == report.kept == len(reference) and stream.report.examples == report.examples
    if task.uses_images:
        assert streamed[0]["pixel_values"].shape == (3, 64, 64)


def test_unreadable_images_are_skipped_and_counted_when_read(tiny_lm_dir, tmp_path):
    folder = caption_parquets(tmp_path, n=6, bad_rows=(1, 4))  # rows 1 and 4: two captions / one caption each
    cfg, task, model, tok, layout = _setup(tiny_lm_dir, tmp_path, "caption", folder, "data.shuffle_buffer=0")
    stream = build_train_stream(cfg, task, model, tok, layout)
    assert stream.report.examples == 0  # nothing is read before iterating
    items = _items(stream.epoch(0))
    report = stream.report  # two unreadable images, three captions of them
    assert report.examples == 9 and len(report.bad_images) == 2 and report.kept == len(items) == 6
    assert "[streamed batch][2]: cannot identify image" in report.bad_image_example
    cfg.data.on_bad_image = "fail"
    with pytest.raises(Exception, match="set data.on_bad_image=skip"):
        _items(build_train_stream(cfg, task, model, tok, layout).epoch(0))


def _ids(items) -> list[tuple]:
    return [tuple(item["input_ids"].tolist()) for item in items]


def test_shuffling_is_seeded_per_epoch_and_processes_split_the_stream(tiny_lm_dir, tmp_path):
    folder = qa_parquets(tmp_path, n=24, n_files=4)
    cfg, task, model, tok, layout = _setup(tiny_lm_dir, tmp_path, "qa", folder, "data.shuffle_buffer=8")
    whole = _ids(build_train_stream(cfg, task, model, tok, layout).epoch(0))
    again = build_train_stream(cfg, task, model, tok, layout)
    assert _ids(again.epoch(0)) == whole and _ids(again.epoch(1)) != whole  # seeded; reshuffled per epoch
    assert sorted(_ids(again.epoch(1))) == sorted(whole)
    parts = [build_train_stream(cfg, task, model, tok, layout, rank=r, world_size=2) for r in (0, 1)]
    assert all(p.own_shards() for p in parts)  # 4 files over 2 processes: each opens 2 of them
    seen = [_ids(p.epoch(3)) for p in parts]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(whole)


def _stop_and_resume(stream, epoch: int, k: int) -> tuple[list, list]:
    it = iter(stream.epoch(epoch))
    first = [next(it) for _ in range(k)]
    state = stream.state_dict()
    return _ids(first), _ids(stream.epoch(epoch, state))


def test_a_stream_without_shuffling_resumes_exactly(tiny_lm_dir, tmp_path):
    folder = caption_parquets(tmp_path, n=12, n_files=3)
    cfg, task, model, tok, layout = _setup(tiny_lm_dir, tmp_path, "caption", folder, "data.shuffle_buffer=0")
    stream = build_train_stream(cfg, task, model, tok, layout)
    whole = _ids(stream.epoch(0))
    for k in (1, 5, 9, 17):  # within a map batch, at a file's end, past several files
        first, rest = _stop_and_resume(build_train_stream(cfg, task, model, tok, layout), 0, k)
        assert first + rest == whole, k


def test_a_shuffled_stream_resumes_as_documented(tiny_lm_dir, tmp_path):
    """Exact: what was read, no repeats, the order of every later epoch. Approximate (documented): the rows in the
    shuffle buffer at the checkpoint are lost to the rest of that epoch (at most shuffle_buffer)."""
    folder = qa_parquets(tmp_path, n=24, n_files=4)
    cfg, task, model, tok, layout = _setup(tiny_lm_dir, tmp_path, "qa", folder, "data.shuffle_buffer=5")
    stream = build_train_stream(cfg, task, model, tok, layout)
    epoch0, epoch1 = _ids(stream.epoch(0)), _ids(stream.epoch(1))
    resumed = build_train_stream(cfg, task, model, tok, layout)
    first, rest = _stop_and_resume(resumed, 0, 7)
    assert first == epoch0[:7]
    assert not set(first) & set(rest) and set(rest) <= set(epoch0) and len(set(rest)) == len(rest)
    assert len(epoch0) - len(first) - len(rest) <= 5
    assert _ids(resumed.epoch(1)) == epoch1


def test_config_refusals():
    base = ["data.source=hf", "data.hf_path=x", "train.max_steps=3", "data.val_limit=4"]
    assert load_config(None, [*base, "data.streaming=true"]).data.shuffle_buffer == 1000
    with pytest.raises(ConfigError, match="train.max_steps is not set"):
        load_config(None, ["data.source=hf", "data.hf_path=x", "data.val_limit=4", "data.streaming=true"])
    with pytest.raises(ConfigError, match="needs data.source=hf"):
        load_config(None, ["data.streaming=true", "train.max_steps=3", "data.val_limit=4"])
    with pytest.raises(ConfigError, match="set data.val_limit"):
        load_config(None, ["data.source=hf", "data.hf_path=x", "train.max_steps=3", "data.streaming=true"])
    with pytest.raises(ConfigError, match="train_limit.*does not apply to a stream"):
        load_config(None, [*base, "data.streaming=true", "data.train_limit=5"])
    with pytest.raises(ConfigError, match="num_workers.*must be 0"):
        load_config(None, [*base, "data.streaming=true", "data.num_workers=2"])
    with pytest.raises(ConfigError, match="shuffle_buffer"):
        load_config(None, [*base, "data.shuffle_buffer=-1"])
