import pytest
import torch

from mtcpeft.core.contexts import ContextIdsError, ContextVocab, Router, build_plan, check_context_ids


def test_vocab_ids_names_namespacing_and_remap():
    v = ContextVocab.of("image, text")
    assert v.names == ("image", "text") and len(v) == 2
    assert v.id("text") == 1 and v.id(-1) == -1 and v.ids(["image", "text"]) == [0, 1]
    cap = v.namespaced("caption")
    assert cap.names == ("caption.image", "caption.text")
    target = ContextVocab.of("qa.question,caption.text,caption.image")
    table = cap.remap_table(target)
    assert table.tolist() == [-1, 2, 1]  # index = id + 1
    ids = torch.tensor([[0, 1, -1]])
    assert table[ids + 1].tolist() == [[2, 1, -1]]
    assert v.remap_table(target, {"image": "caption.image", "text": "qa.question"}).tolist() == [-1, 2, 0]


@pytest.mark.parametrize("bad", ["", ["a", "a"], ["a", ""]])
def test_vocab_rejects_bad_names(bad):
    with pytest.raises(ValueError):
        ContextVocab.of(bad)


def test_vocab_unknown_name_lists_known():
    with pytest.raises(ContextIdsError, match=r"unknown context 'audio'.*\['image', 'text'\]"):
        ContextVocab.of("image,text").id("audio")
    with pytest.raises(ContextIdsError, match="outside"):
        ContextVocab.of("image,text").id(2)


def test_plan_grouped_is_a_stable_sort_of_live_tokens():
    ids = torch.tensor([[2, 0, -1, 1, 0], [1, -1, 2, 2, 0]])
    plan = build_plan(ids, 3)
    assert plan.uniform is None and plan.num_tokens == 10
    assert plan.counts == (3, 2, 3) and plan.num_live == 8
    flat = ids.reshape(-1)
    assert flat[plan.perm].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    # stable: tokens of one context keep their order
    assert plan.perm.tolist() == [1, 4, 9, 3, 5, 0, 7, 8]
    assert plan.live_mask.tolist() == (flat >= 0).tolist()


def test_plan_uniform_path_has_no_permutation():
    plan = build_plan(torch.full((2, 4), 1), 3)
    assert plan.uniform == 1 and plan.perm is None and plan.live_mask is None
    padded = torch.tensor([[1, 1, -1, -1]])
    plan = build_plan(padded, 3)
    assert plan.uniform == 1 and plan.perm is None and plan.live_mask.tolist() == [True, True, False, False]
    dead = build_plan(torch.full((1, 3), -1), 3)
    assert dead.num_live == 0 and dead.uniform is None and dead.perm is None


@pytest.mark.parametrize(
    "ids, shape, match",
    [
        (torch.zeros(2, 3), None, "integer ids"),
        (torch.zeros(2, 3, dtype=torch.bool), None, "integer ids"),
        (torch.zeros(2, 3, dtype=torch.long), (2, 4), r"shape \(2, 3\).*\(2, 4\)"),
        (torch.tensor([[0, 3]]), None, r"values in \[0, 3\].*3 contexts"),
        (torch.tensor([[0, -2]]), None, r"values in \[-2, 0\]"),
        ([0, 1], None, "torch.Tensor"),
    ],
)
def test_bad_context_ids_raise_clear_errors(ids, shape, match):
    with pytest.raises(ContextIdsError, match=match):
        check_context_ids(ids, 3, shape)


def test_router_refuses_missing_or_stale_plan():
    r = Router(2)
    with pytest.raises(ContextIdsError, match="no routing plan"):
        r.plan_for(4, "layer")
    r.route(torch.zeros(1, 4, dtype=torch.long))
    assert r.plan_for(4, "layer").num_tokens == 4
    with pytest.raises(ContextIdsError, match="stale"):
        r.plan_for(5, "layer")
