"""BLEU-4 / ROUGE as the ChatGLM fine-tuning scripts compute them, on pairs whose values are known."""
from __future__ import annotations

import math

import pytest

from workers.training.metrics import METRIC_KEYS, corpus_scores, score_texts, score_tokens


def test_identical_pair_scores_100():
    s = score_texts("这款连衣裙采用优质面料，舒适透气，显瘦百搭。", "这款连衣裙采用优质面料，舒适透气，显瘦百搭。")
    for k in METRIC_KEYS:
        assert s[k] == pytest.approx(100.0, abs=1e-6), k


def test_disjoint_pair_scores_0():
    s = score_tokens(["甲", "乙", "丙", "丁"], ["子", "丑", "寅", "卯"])
    for k in METRIC_KEYS:
        assert s[k] == pytest.approx(0.0, abs=1e-6), k


def test_hand_computed_pair():
    # ref a b c d e / hyp a b c d f: n-gram precisions 4/5, 3/4, 2/3, 1/2, equal lengths (BP = 1),
    # no zero count so smoothing method3 changes nothing: BLEU-4 = (0.8*0.75*(2/3)*0.5) ** 0.25.
    # ROUGE-1 F = 4/5, ROUGE-2 F = 3/4 (bigrams ab bc cd de vs ab bc cd df), ROUGE-L F = LCS 4 / 5.
    s = score_tokens(list("abcdf"), list("abcde"))
    assert s["bleu-4"] == pytest.approx(100 * (0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25, abs=1e-6)
    assert s["rouge-1"] == pytest.approx(80.0, abs=1e-4)
    assert s["rouge-2"] == pytest.approx(75.0, abs=1e-4)
    assert s["rouge-l"] == pytest.approx(80.0, abs=1e-4)


def test_smoothing_method3_on_missing_4grams():
    # hyp a b c x / ref a b c d: p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0/1 -> method3 gives the
    # first zero count 1/(2^1 * 1) = 1/2. BLEU = (3/4 * 2/3 * 1/2 * 1/2) ** 0.25.
    s = score_tokens(list("abcx"), list("abcd"))
    assert s["bleu-4"] == pytest.approx(100 * (0.75 * (2 / 3) * 0.5 * 0.5) ** 0.25, abs=1e-6)


def test_empty_prediction_scores_zero_and_average():
    s = score_texts("", "参考文本")
    assert all(s[k] == 0.0 for k in METRIC_KEYS)
    agg = corpus_scores(["这款连衣裙采用优质面料，舒适透气，显瘦百搭。", ""], ["这款连衣裙采用优质面料，舒适透气，显瘦百搭。", "参考"])
    assert agg["n_samples"] == 2
    assert agg["rouge-1"] == pytest.approx(50.0, abs=1e-3)
    assert math.isclose(agg["bleu-4"], 50.0, abs_tol=1e-3)
