"""Diversity metrics (paper §4.2): Distinct-n and Self-BLEU-n on hand-computed examples."""
import math

import pytest

import dpg_min as dm


def test_tokens_are_words_and_punctuation_runs():
    assert dm.tokens_of("Hi, there!! it's") == ["Hi", ",", "there", "!!", "it", "'", "s"]


@pytest.mark.parametrize("texts, n, expected", [
    (["a b a"], 1, 2 / 3),                    # a, b, a: two distinct of three
    (["a b a"], 2, 1.0),                      # (a b), (b a)
    (["a b", "a b"], 2, 1 / 2),               # the same bigram in both samples
    (["a b c", "d e f"], 1, 1.0),
    (["x x x x"], 1, 1 / 4),
    (["a b", "b c"], 3, math.nan),            # no trigram at all; n-grams never span two texts
])
def test_distinct_n(texts, n, expected):
    got = dm.distinct_n(texts, n)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_self_bleu_of_identical_samples_is_one():
    assert dm.self_bleu(["the cat sat on the mat"] * 3) == pytest.approx([1.0, 1.0, 1.0])


def test_self_bleu_of_partly_shared_samples():
    """a b c d vs a b c e: p1 = 3/4, p2 = 2/3, p3 = 1/2, no 4-gram in common (method1: 0.1/1), BP = 1."""
    bleu3, bleu4 = dm.self_bleu(["a b c d", "a b c e"], (3, 4))
    assert bleu3 == pytest.approx((3 / 4 * 2 / 3 * 1 / 2) ** (1 / 3))
    assert bleu4 == pytest.approx((3 / 4 * 2 / 3 * 1 / 2 * 0.1) ** (1 / 4))


def test_self_bleu_of_disjoint_samples_is_zero():
    """No token in common: nltk gives 0 (smoothing only fills in longer n-grams once a unigram matches)."""
    assert dm.self_bleu(["a b c d e", "f g h i j"]) == [0, 0, 0]
    assert dm.self_bleu(["a b c d e", "a g h i j"], (3,))[0] == pytest.approx((1 / 5 * 0.1 / 4 * 0.1 / 3) ** (1 / 3))
    assert math.isnan(dm.self_bleu(["alone"], (3,))[0])   # one sample has no others to compare with
