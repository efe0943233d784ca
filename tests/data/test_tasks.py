"""Every registered task: sequence layout (positions, contexts, label mask), generation prompts, truncation, and
batched left-padded generation equal to one-by-one generation."""

import pytest
import torch

from mtcpeft.core.losses import IGNORE
from mtcpeft.evaluation.generation import generate_texts, left_pad
from mtcpeft.training.build import build_task_model
from tasks import TASKS, get_task
from mtcpeft.data.task import EmptyTargetError, SequenceLayout
from support.runs import tiny_run_config
from support.tokenizer import make_tokenizer

# one example per registered task, in its reader's format; a new task must add one here
SAMPLES = {
    "caption": {"image_id": 7, "image": "x.png", "caption": "a red circle."},
    "vqa": {"question_id": 11, "image_id": 7, "image": "x.png", "question": "what color is the shape?",
            "answer": "red", "answers": ["red"] * 10},
    "qa": {"id": "q1", "context": "there is a red circle in the picture.", "question": "what color is the shape?",
           "answers": ["red"], "answer_starts": [11], "impossible": False},
}
TARGET = {"caption": "a red circle.", "vqa": " red", "qa": " red"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def layout_for(task, T=6):
    return SequenceLayout(T if task.uses_images else 0, 96, 24)


def test_every_registered_task_has_a_sample():
    assert set(TASKS.names()) == set(SAMPLES), "add an example of the new task to SAMPLES"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_layout_contexts_and_label_mask(tok, name):
    task = get_task(name)
    layout = layout_for(task)
    enc = task.encode(SAMPLES[name], tok, layout)
    S = layout.seq_len
    assert all(len(enc[k]) == S for k in ("input_ids", "context_ids", "labels", "attention_mask", "image_mask"))
    ids, ctx, lab, att, img = (enc[k] for k in ("input_ids", "context_ids", "labels", "attention_mask", "image_mask"))
    target = tok(TARGET[name], add_special_tokens=False).input_ids + [tok.eos_token_id]
    live = sum(att)
    # [BOS] first, in the task's BOS context; the target (+ EOS) ends the live tokens; the rest is padding
    assert ids[0] == tok.bos_token_id and ctx[0] == task.vocab.id(task.bos_context)
    assert ids[live - len(target) : live] == target
    assert att == [1] * live + [0] * (S - live) and ctx[live:] == [-1] * (S - live) and lab[live:] == [IGNORE] * (S - live)
    # loss exactly on the target tokens, which take the generated context
    assert [i for i, v in enumerate(lab) if v != IGNORE] == list(range(live - len(target), live))
    assert lab[live - len(target) : live] == target
    assert ctx[live - len(target) : live] == [task.vocab.id(task.generated_context)] * len(target)
    # image positions: exactly T, right after [BOS], in context "image"
    if task.uses_images:
        T = layout.num_image_tokens
        assert img[1 : 1 + T] == [True] * T and sum(img) == T and ctx[1 : 1 + T] == [task.vocab.id("image")] * T
    else:
        assert not any(img)
    # the prompt tokens keep their own contexts (no token of the prompt is in the generated context)
    prompt_ctx = set(ctx[1 : live - len(target)])
    assert task.vocab.id(task.generated_context) not in prompt_ctx
    # the generation prompt is exactly the encoded sequence before the target
    prompt = task.prompt(SAMPLES[name], tok, layout)
    n = live - len(target)
    assert prompt["input_ids"] == ids[:n] and prompt["context_ids"] == ctx[:n] and prompt["image_mask"] == img[:n]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_empty_target_is_refused(tok, name):
    task = get_task(name)
    blank = dict(SAMPLES[name], caption=" ", answer="", answers=[])
    with pytest.raises(EmptyTargetError):
        task.encode(blank, tok, layout_for(task))


def test_long_passage_is_trimmed_from_its_start_and_counted(tok):
    task = get_task("qa")
    layout = SequenceLayout(0, 100, 6)
    long = dict(SAMPLES["qa"], context=" ".join(["a blue rectangle."] * 30) + " the shape is red.")
    enc = task.encode(long, tok, layout)
    assert enc["truncated"] and sum(enc["attention_mask"]) <= 100
    question = tok(" Question: what color is the shape? Answer:", add_special_tokens=False).input_ids
    end = sum(enc["attention_mask"]) - len(tok(" red").input_ids) - 1
    assert enc["input_ids"][end - len(question) : end] == question  # the question survives whole
    tail = tok("the shape is red.", add_special_tokens=False).input_ids
    assert enc["input_ids"][end - len(question) - len(tail) : end - len(question)] == tail  # the passage's end too
    assert not task.encode(SAMPLES["qa"], tok, layout)["truncated"]


def test_left_pad_marks_padding_as_no_context():
    b = left_pad([{"input_ids": [5, 6, 7], "context_ids": [0, 0, 1], "attention_mask": [1, 1, 1],
                   "image_mask": [False] * 3},
                  {"input_ids": [8], "context_ids": [1], "attention_mask": [1], "image_mask": [False]}], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["context_ids"].tolist() == [[0, 0, 1], [-1, -1, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def _random_adaptors(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("name", ["qa", "vqa"])
def test_batched_left_padded_generation_equals_one_by_one(tiny_lm_dir, tmp_path, name):
    task = get_task(name)
    cfg = tiny_run_config(tiny_lm_dir, tmp_path, f"task={name}", "data.seq_len=128", "data.max_target_tokens=6")
    model, tok, layout = build_task_model(cfg, task)
    _random_adaptors(model)  # non-zero LoRA B: every context's group changes the output
    base = SAMPLES[name]
    questions = ["what color is the shape?", "is there a blue rectangle in the image?", "what shape is it?"]
    examples = [dict(base, question=q, context=base.get("context", "") + " x" * k) for k, q in enumerate(questions)]
    feats = torch.randn(len(examples), layout.num_image_tokens, model.encoder.dim) if task.uses_images else None
    image_input = (lambda i: {"image_features": feats[i]}) if feats is not None else None
    batched = generate_texts(model, tok, layout, task, examples, image_input, batch_size=3, max_new_tokens=5)
    single = [generate_texts(model, tok, layout, task, [e], (lambda _, i=i: image_input(i)) if feats is not None
                             else None, batch_size=1, max_new_tokens=5)[0] for i, e in enumerate(examples)]
    assert batched == single


# ------------------------------------------------------------------------------- tasks of a user's package
@pytest.fixture
def registry(monkeypatch):
    """TASKS as it is, restored after the test (a user task registered here leaves no trace)."""
    from mtcpeft.data.task import TASKS as registry

    monkeypatch.setattr(registry, "_items", dict(registry._items))
    return registry


def test_a_task_module_of_a_user_package_registers_its_task(tmp_path, monkeypatch, registry, tok):
    from mtcpeft.data.task import import_task_modules
    from support.user_task import write_user_task

    module = write_user_task(tmp_path, "mtcpeft_user_pkg_a", "user_qa")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KeyError, match="unknown task 'user_qa'"):
        get_task("user_qa")
    import_task_modules([module])
    task = get_task("user_qa")
    assert task.name == "user_qa" and "user_qa" in registry
    sample = {"id": "q1", "question": "what color is the shape?", "answers": ["red"]}
    enc = task.encode(sample, tok, layout_for(task))
    target = tok(" red", add_special_tokens=False).input_ids + [tok.eos_token_id]
    live = sum(enc["attention_mask"])
    assert [t for t in enc["labels"] if t != IGNORE] == target == enc["input_ids"][live - len(target):live]
    assert enc["context_ids"][live - len(target):live] == [task.vocab.id("reply")] * len(target)


def test_an_entry_point_of_an_installed_package_is_found_at_lookup(tmp_path, monkeypatch, registry):
    from mtcpeft.data.task import task_names
    from support.user_task import write_user_task

    write_user_task(tmp_path, "mtcpeft_user_pkg_b", "user_ep_qa", entry_point=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "user_ep_qa" not in registry and "user_ep_qa" in task_names()  # listed before it is imported
    assert get_task("user_ep_qa").name == "user_ep_qa" and "user_ep_qa" in registry


def test_unknown_task_names_list_the_known_ones_and_say_how_to_register(registry):
    from mtcpeft.errors import MtcpeftError

    with pytest.raises(MtcpeftError) as e:
        get_task("nope")
    message = str(e.value)
    assert "unknown task 'nope'; known: caption, qa, vqa" in message
    assert "register_task" in message and "--task-module" in message and "mtcpeft.tasks" in message


def test_a_task_module_that_cannot_be_imported_is_named():
    from mtcpeft.data.task import TaskModuleError, import_task_modules

    with pytest.raises(TaskModuleError, match="cannot import task module 'no_such_pkg.tasks'.*PYTHONPATH"):
        import_task_modules(["no_such_pkg.tasks"])


def test_layout_counts_image_tokens_only_for_tasks_that_read_images():
    from types import SimpleNamespace

    data, encoder = SimpleNamespace(seq_len=96, max_target_tokens=24), SimpleNamespace(num_tokens=6)
    assert get_task("caption").layout(data, encoder) == SequenceLayout(6, 96, 24)
    assert get_task("qa").layout(data, encoder) == SequenceLayout(0, 96, 24)  # a text task on an image model
    assert get_task("vqa").layout(data) == SequenceLayout(0, 96, 24)  # no encoder: no image positions
