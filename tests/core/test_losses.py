import pytest
import torch

from conftest import tiny_lm
from mtcpeft import ContextModel
from mtcpeft.core.losses import IGNORE, mean_token_nll, perplexity, positions_to_keep, target_nll, token_nll


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_loss_on_kept_final_logits_equals_hugging_face_full_loss(family):
    m = ContextModel(tiny_lm(family), "image,text", "lora")
    ids = torch.randint(0, 128, (3, 12))
    ctx = torch.randint(-1, 2, (3, 12))
    labels = ids.clone()
    labels[:, :7] = IGNORE  # prompt positions
    labels[1, 10:] = IGNORE  # padding of a shorter example
    full = m(ids, context_ids=ctx, labels=labels)  # Hugging Face's own shifted mean loss over all logits
    k = positions_to_keep(labels)
    assert k == 12 - 7 + 1
    part = m(ids, context_ids=ctx, logits_to_keep=k)
    assert part.logits.shape[1] == k
    torch.testing.assert_close(mean_token_nll(part.logits, labels), full.loss)
    torch.testing.assert_close(mean_token_nll(full.logits, labels), full.loss)
    nll, n = token_nll(part.logits, labels)
    assert n.tolist() == [5, 3, 5] and torch.isclose(nll.sum() / n.sum(), full.loss)


def test_no_labels_keeps_nothing_special():
    labels = torch.full((2, 5), IGNORE)
    assert positions_to_keep(labels) == 1
    assert positions_to_keep(torch.zeros(2, 5, dtype=torch.long)) == 5


def test_target_nll_sums_over_batches_as_one_batch():
    m = ContextModel(tiny_lm("llama"), "image,text", "lora")
    ids, ctx = torch.randint(0, 128, (4, 10)), torch.randint(-1, 2, (4, 10))
    labels = ids.clone()
    labels[:, :6] = IGNORE
    labels[3, 8:] = IGNORE
    batches = [dict(input_ids=ids[i:i + 2], context_ids=ctx[i:i + 2], labels=labels[i:i + 2]) for i in (0, 2)]
    nll, count = target_nll(m, batches)
    full = m(ids, context_ids=ctx, labels=labels).loss.detach()  # Hugging Face's mean over all 4 examples
    assert count == 4 * 4 - 2
    assert nll / count == pytest.approx(float(full), rel=1e-5)
    assert perplexity(nll, count) == pytest.approx(float(full.exp()), rel=1e-5)
    seen = []
    assert target_nll(m, batches, gather=lambda t: seen.append(t) or t) == (nll, count)
    assert len(seen) == 2  # every batch's (nll, count) goes through the gather
