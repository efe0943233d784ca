"""Metrics against hand-computed values: SQuAD EM/F1, VQA accuracy, BLEU-4 and CIDEr-D, perplexity."""
import math

import pytest

from mtcpeft.evaluation.metrics import caption_scores, perplexity, squad_scores, vqa_accuracy
from mtcpeft.evaluation.metrics.caption import bleu4, cider_d, tokenize
from mtcpeft.evaluation.metrics.squad import normalize_answer as squad_norm
from mtcpeft.evaluation.metrics.squad import token_f1
from mtcpeft.evaluation.metrics.vqa import normalize_answer as vqa_norm
from mtcpeft.evaluation.metrics.vqa import vqa_example_accuracy


# ----------------------------------------------------------------------------------------------------- SQuAD
@pytest.mark.parametrize("text, norm", [
    ("The  Quick, brown fox!", "quick brown fox"),
    ("an apple a day", "apple day"),
    ("Theory of the Anthem", "theory of anthem"),  # articles only as whole words
    ("U.S.A.", "usa"),
    ("  Joseph\tPriestley's ", "joseph priestleys"),
])
def test_squad_normalisation(text, norm):
    assert squad_norm(text) == norm


def test_squad_token_f1_by_hand():
    # pred tokens [cat, sat, on, mat], gold [cat, sat]: 2 shared, P = 2/4, R = 2/2, F1 = 2PR/(P+R) = 2/3
    assert token_f1("The cat sat on a mat.", "a cat sat") == pytest.approx(2 / 3)
    # [priestley, published] vs [joseph, priestley]: 1 shared, P = R = 1/2, F1 = 1/2
    assert token_f1("Priestley published", "Joseph Priestley") == pytest.approx(0.5)
    assert token_f1("in 1774", "1771") == 0.0


def test_squad_scores_max_over_golds_unanswerable_and_missing():
    refs = {"a": ["Joseph Priestley", "Priestley"],  # pred "priestley": EM 1 via the second gold
            "b": ["Joseph Priestley"],  # pred "Priestley published": EM 0, F1 1/2
            "c": [],  # unanswerable: the empty prediction scores 1
            "d": [],  # unanswerable, but a span was predicted: 0
            "e": ["1771"]}  # no prediction: 0
    preds = {"a": "priestley", "b": "Priestley published", "c": "", "d": "1774", "x": "ignored"}
    s = squad_scores(preds, refs)
    assert s["per_example"]["a"] == {"exact_match": 1.0, "f1": 1.0}
    assert s["per_example"]["b"] == {"exact_match": 0.0, "f1": pytest.approx(0.5)}
    assert s["per_example"]["c"] == {"exact_match": 1.0, "f1": 1.0}
    assert s["per_example"]["d"] == {"exact_match": 0.0, "f1": 0.0}
    assert s["missing"] == 1 and s["count"] == 5
    assert s["exact_match"] == pytest.approx(2 / 5)  # a, c
    assert s["f1"] == pytest.approx((1 + 0.5 + 1) / 5)


def test_squad_gold_that_normalises_to_nothing_is_dropped():
    # v2.0 script: golds normalising to "" are removed, leaving this question unanswerable
    assert squad_scores({"q": ""}, {"q": ["The", "."]})["exact_match"] == 1.0


# ------------------------------------------------------------------------------------------------------- VQA
@pytest.mark.parametrize("m, acc", [
    # an answer given by m of 10 humans: leaving out one of those m leaves m-1 matches, leaving out one of the
    # other 10-m leaves m; acc = (m * min((m-1)/3, 1) + (10-m) * min(m/3, 1)) / 10
    (0, 0.0),
    (1, 0.3),  # (1*0 + 9*(1/3)) / 10 = 3/10
    (2, 0.6),  # (2*(1/3) + 8*(2/3)) / 10 = (2/3 + 16/3) / 10 = 6/10
    (3, 0.9),  # (3*(2/3) + 7*1) / 10 = 9/10
    (4, 1.0),  # (4*1 + 6*1) / 10
    (10, 1.0),
])
def test_vqa_leave_one_out_accuracy(m, acc):
    answers = ["red"] * m + ["blue"] * (10 - m)
    assert vqa_example_accuracy("red", answers) == pytest.approx(acc)


@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"),
    ("the dog.", "dog"),
    ("dont", "don't"),
    ("black/white", "black white"),  # a mark not touching a space becomes a space
    ("yes !", "yes"),  # touching a space: deleted
    ("1,000", "1000"),  # digit,digit: every mark deleted
    ("3.5 feet", "3.5 feet"),  # a period before a digit stays
    ("An Umbrella\n", "umbrella"),
    ("isnt it", "isn't it"),
])
def test_vqa_normalisation(raw, norm):
    assert vqa_norm(raw) == norm


def test_vqa_references_as_the_official_script_treats_them():
    # differing human answers get the punctuation step: "black/white" -> "black white" (4 humans -> 1.0)
    assert vqa_example_accuracy("Black white", ["black/white"] * 4 + ["black"] * 6) == 1.0
    # unanimous answers are compared untouched, so a prediction normalised away from them misses
    assert vqa_example_accuracy("dog!", ["dog!"] * 10) == 0.0
    assert vqa_example_accuracy("dog!", ["dog!"] * 10, normalize_references=True) == 1.0


def test_vqa_accuracy_mean_and_missing():
    refs = {1: ["2"] * 2 + ["3"] * 8, 2: ["dog"] * 3 + ["cat"] * 7, 3: ["don't"] * 4 + ["no"] * 6, 4: ["yes"] * 10}
    s = vqa_accuracy({1: "Two", 2: "the dog.", 3: "dont"}, refs)
    assert s["per_example"] == {1: pytest.approx(0.6), 2: pytest.approx(0.9), 3: 1.0, 4: 0.0}
    assert s["missing"] == 1 and s["accuracy"] == pytest.approx((0.6 + 0.9 + 1.0) / 4)


def test_vqa_accuracy_takes_dicts():
    with pytest.raises(TypeError, match="vqa_example_accuracy"):
        vqa_accuracy("red", ["red"] * 10)


def test_vqa_refuses_a_single_reference():
    with pytest.raises(ValueError, match="repeat a single answer 10 times"):
        vqa_accuracy({1: "red"}, {1: ["red"]})


# ---------------------------------------------------------------------------------------------- captions
def test_caption_tokenisation():
    assert tokenize("A man's T-shirt, 3.5 feet (tall)!") == ["a", "man", "'s", "t-shirt", "3.5", "feet", "tall"]
    assert tokenize("Don't \"go\"...\nNow") == ["do", "n't", "go", "now"]


def test_bleu4_hand_worked_corpus():
    refs = {1: ["the cat is on the mat", "a cat sat on the mat"], 2: ["a small dog runs in the park"]}
    preds = {1: "The cat sat on the mat.", 2: "a small dog runs"}
    # image 1, candidate of 6 tokens, clipped matches / candidate n-grams:
    #   1-grams 6/6; 2-grams 5/5; 3-grams 3/4 ("the cat sat" in neither ref); 4-grams 2/3 ("the cat sat on")
    #   closest reference length 6 -> no brevity penalty; sentence BLEU-4 = (1 * 1 * 3/4 * 2/3) ** (1/4)
    # image 2, 4 tokens all in the one reference: 4/4, 3/3, 2/2, 1/1; reference length 7
    # corpus: matches [10, 8, 5, 3] of [10, 8, 6, 4]; lengths: candidate 10, reference 6 + 7 = 13
    #   BLEU-4 = (1 * 1 * 5/6 * 3/4) ** (1/4) * exp(1 - 13/10)
    s = caption_scores(preds, refs)
    assert s["bleu4"] == pytest.approx((5 / 6 * 3 / 4) ** 0.25 * math.exp(1 - 13 / 10), rel=1e-6)
    assert bleu4(preds, refs) == pytest.approx((5 / 6 * 3 / 4) ** 0.25 * math.exp(1 - 13 / 10), rel=1e-6)
    assert s["bleu"][0] == pytest.approx(math.exp(1 - 13 / 10), rel=1e-6)  # BLEU-1: all unigrams match
    assert s["per_example"][1]["bleu4"] == pytest.approx((3 / 4 * 2 / 3) ** 0.25, rel=1e-6)
    # image 2 alone: precisions 1, brevity penalty exp(1 - 7/4)
    assert s["per_example"][2]["bleu4"] == pytest.approx(math.exp(1 - 7 / 4), rel=1e-6)


def test_cider_d_hand_worked():
    # N = 2 images, idf(g) = log(N / df(g)), df counted over each image's references:
    #   df(red) = df(blue) = df(red circle) = df(blue circle) = 1 -> idf log 2; df(circle) = 2 -> idf 0;
    #   n-grams absent from all references get df 1 (idf log 2).
    # image 1: candidate == reference "red circle": unigram and bigram cosine 1, 3- and 4-grams empty (0);
    #   CIDEr-D = 10 * mean_n(cos_n) = 10 * (1 + 1 + 0 + 0) / 4 = 5
    # image 2: "blue square" vs "blue circle": unigram vectors (blue: l2, square: l2) and (blue: l2, circle: 0),
    #   clipped dot l2^2, norms sqrt(2) l2 and l2 -> cos 1/sqrt(2); bigrams share nothing -> 0;
    #   equal lengths -> no Gaussian penalty; CIDEr-D = 10 * (1/sqrt(2)) / 4
    s = caption_scores({1: "red circle", 2: "blue square"}, {1: ["red circle"], 2: ["blue circle"]})
    assert s["per_example"][1]["cider"] == pytest.approx(5.0)
    assert s["per_example"][2]["cider"] == pytest.approx(10 / math.sqrt(2) / 4)
    assert s["cider"] == pytest.approx((5.0 + 10 / math.sqrt(2) / 4) / 2)
    assert cider_d({1: "red circle", 2: "blue square"}, {1: ["red circle"], 2: ["blue circle"]}) == s["cider"]


def test_cider_d_prefers_the_candidate_that_matches_its_references():
    refs = {1: ["a red circle on a plain background", "a red circle"],
            2: ["a blue square in the picture", "a blue square"],
            3: ["a green triangle on a plain background", "a green triangle"]}
    perfect = caption_scores({k: v[0] for k, v in refs.items()}, refs)
    partial = caption_scores({1: "a red shape", 2: "a blue square", 3: "a triangle on a background"}, refs)
    assert perfect["cider"] > partial["cider"] > 0
    for k in refs:
        assert perfect["per_example"][k]["cider"] > partial["per_example"][k]["cider"] or k == 2
    # the Gaussian length penalty: the same words, padded by repetition, score lower
    longer = caption_scores({**{k: v[0] for k, v in refs.items()}, 1: refs[1][0] + " red red red red"}, refs)
    assert longer["per_example"][1]["cider"] < perfect["per_example"][1]["cider"]


def test_caption_scores_need_every_prediction():
    with pytest.raises(KeyError, match="no prediction for 1 of 2 images"):
        caption_scores({1: "a cat"}, {1: ["a cat"], 2: ["a dog"]})


# -------------------------------------------------------------------------------------------- perplexity
def test_perplexity():
    assert perplexity(4 * math.log(2), 2) == pytest.approx(4.0)  # mean NLL 2 log 2 -> e^(2 log 2) = 4
    with pytest.raises(ValueError, match="at least one scored token"):
        perplexity(0.0, 0)
    assert perplexity(1e6, 1) == math.inf  # a diverged loss reads as inf, it does not raise OverflowError
