"""Generation quality metrics, computed the way the ChatGLM fine-tuning scripts compute them.

ChatGLM3 `finetune_demo/finetune_hf.py::compute_metrics` (and ChatGLM-6B `ptuning/main.py`):
prediction and reference are cut into words with `jieba.cut` (every piece kept, spaces
included), ROUGE comes from `rouge_chinese.Rouge().get_scores(" ".join(pred), " ".join(ref))`
(the F score), BLEU from `nltk.translate.bleu_score.sentence_bleu([ref], pred,
smoothing_function=SmoothingFunction().method3)` with the default uniform 4-gram weights.
Each metric is computed per sample and averaged over samples (an average of sentence
scores, NOT corpus BLEU).

Scale: every value is on 0..100 (ChatGLM-6B's ptuning multiplies both BLEU and ROUGE by 100;
ChatGLM3's finetune_hf.py multiplies ROUGE but leaves BLEU on 0..1 — we use 0..100 for both
and say so in the key descriptions).

Output keys (stable, used in job.result and the adapter manifest):
  "bleu-4"  sentence-level BLEU-4 (nltk sentence_bleu, uniform 1..4-gram weights, smoothing
            method3, jieba words), averaged over samples, x100
  "rouge-1" / "rouge-2" / "rouge-l"  rouge_chinese F-measure on jieba words, averaged, x100
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

METRIC_DESCRIPTIONS: dict[str, str] = {
    "bleu-4": "BLEU-4, sentence-level (nltk sentence_bleu, uniform 1-4-gram weights, "
              "SmoothingFunction().method3) on jieba words, averaged over samples, 0-100",
    "rouge-1": "ROUGE-1 F (rouge_chinese) on jieba words, averaged over samples, 0-100",
    "rouge-2": "ROUGE-2 F (rouge_chinese) on jieba words, averaged over samples, 0-100",
    "rouge-l": "ROUGE-L F (rouge_chinese, summary-level LCS) on jieba words, averaged over samples, 0-100",
}
METRIC_KEYS = tuple(METRIC_DESCRIPTIONS)


def words(text: str) -> list[str]:
    """jieba word segmentation, every piece kept (as the ChatGLM scripts do)."""
    import jieba

    jieba.setLogLevel(60)  # silence "Building prefix dict" chatter in worker logs
    return list(jieba.cut(text.strip()))


def score_tokens(pred: Sequence[str], ref: Sequence[str]) -> dict[str, float]:
    """Metrics of one (prediction, reference) pair of token lists, each 0..100."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    pred, ref = list(pred), list(ref)
    hyp_s, ref_s = " ".join(pred), " ".join(ref)
    if not hyp_s.split() or not ref_s.split():
        # rouge_chinese raises on an empty side; ChatGLM-6B's script scores it 0.
        rouge = {k: 0.0 for k in ("rouge-1", "rouge-2", "rouge-l")}
    else:
        scores = Rouge().get_scores(hyp_s, ref_s)[0]
        rouge = {k: float(v["f"]) * 100 for k, v in scores.items()}
    if not pred or not ref:
        bleu = 0.0
    else:
        bleu = float(sentence_bleu([ref], pred, smoothing_function=SmoothingFunction().method3)) * 100
    return {"bleu-4": bleu, **rouge}


def score_texts(pred: str, ref: str) -> dict[str, float]:
    return score_tokens(words(pred), words(ref))


def corpus_scores(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """Per-sample scores averaged over samples (the ChatGLM scripts' `np.mean` of each list)."""
    if len(preds) != len(refs):
        raise ValueError("preds and refs differ in length")
    if not preds:
        return {k: None for k in METRIC_KEYS} | {"n_samples": 0}
    per = [score_texts(p, r) for p, r in zip(preds, refs)]
    out: dict[str, Any] = {k: round(sum(s[k] for s in per) / len(per), 4) for k in METRIC_KEYS}
    out["n_samples"] = len(per)
    return out
