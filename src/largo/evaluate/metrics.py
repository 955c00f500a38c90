"""Pure metric functions for classification, regression and language-model outputs.

Every function takes arrays and returns plain Python values (``float``, ``int``, ``list``, ``dict``,
``None``) so the result can go straight into ``json.dumps`` and ``metrics.json``. No printing, no
file I/O.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm

_PROB_EPS = 1e-12
_MAX_LOG_PERPLEXITY = 700.0  # exp(709) is the largest finite float64; stay a little below it


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    labels: list[str],
    probs: np.ndarray | None = None,
) -> dict:
    """Accuracy, precision/recall/F1 (macro, micro, weighted), per-class scores and confusion matrix.

    Args:
        y_true: int class indices into ``labels``, shape [n].
        y_pred: int class indices into ``labels``, shape [n].
        labels: class names; every one appears in ``per_class`` and the confusion matrix, even when
            it is absent from both ``y_true`` and ``y_pred``.
        probs: optional class probabilities, shape [n, k]; adds ``log_loss`` and, when k >= 3,
            ``top2_accuracy``.

    Returns:
        A JSON-serializable dict. Scores of a class that is never predicted (or never true) are 0.
    """
    y_true = np.asarray(y_true).reshape(-1).astype(np.int64)
    y_pred = np.asarray(y_pred).reshape(-1).astype(np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} items but y_pred has {y_pred.size}")
    label_names = [str(label) for label in labels]
    index = list(range(len(label_names)))
    n = int(y_true.size)

    out: dict = {"labels": label_names, "support": n}
    if n == 0:
        for key in ("accuracy", *_averaged_keys()):
            out[key] = None
        out["per_class"] = {
            name: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for name in label_names
        }
        out["confusion_matrix"] = [[0] * len(index) for _ in index]
        return out

    out["accuracy"] = float(skm.accuracy_score(y_true, y_pred))
    for average in ("macro", "micro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=index, average=average, zero_division=0
        )
        out[f"precision_{average}"] = float(p)
        out[f"recall_{average}"] = float(r)
        out[f"f1_{average}"] = float(f)

    p, r, f, s = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=index, average=None, zero_division=0
    )
    out["per_class"] = {
        name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, name in enumerate(label_names)
    }
    cm = skm.confusion_matrix(y_true, y_pred, labels=index)
    out["confusion_matrix"] = [[int(v) for v in row] for row in cm]

    if probs is not None:
        out.update(_probability_metrics(y_true, np.asarray(probs, dtype=np.float64)))
    return out


def _averaged_keys() -> list[str]:
    return [f"{m}_{a}" for a in ("macro", "micro", "weighted") for m in ("precision", "recall", "f1")]


def _probability_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict:
    """Log loss and top-2 accuracy from [n, k] probabilities, made safe against 0, NaN and bad sums."""
    if probs.ndim != 2 or probs.shape[0] != y_true.size:
        raise ValueError(f"probs must have shape [{y_true.size}, k], got {list(probs.shape)}")
    k = probs.shape[1]
    # NaN or negative entries become 0; clip then renormalize so every row is a distribution.
    probs = np.nan_to_num(probs, nan=0.0, posinf=1.0, neginf=0.0)
    probs = np.clip(probs, _PROB_EPS, None)
    probs = probs / probs.sum(axis=1, keepdims=True)
    out: dict = {"log_loss": float(skm.log_loss(y_true, probs, labels=list(range(k))))}
    if k >= 3:
        out["top2_accuracy"] = float(skm.top_k_accuracy_score(y_true, probs, k=2, labels=list(range(k))))
    return out


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """MSE, RMSE, MAE and R² for a numeric output.

    ``r2`` is ``None`` when it is undefined: fewer than 2 samples or a constant ``y_true``.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.ndim == 2 and y_true.shape[1] == 1:
        y_true = y_true[:, 0]
    if y_pred.ndim == 2 and y_pred.shape[1] == 1:
        y_pred = y_pred[:, 0]
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {list(y_true.shape)} but y_pred has {list(y_pred.shape)}")
    n = int(y_true.shape[0]) if y_true.ndim else 1
    if n == 0:
        return {"mse": None, "rmse": None, "mae": None, "r2": None, "support": 0}

    mse = float(skm.mean_squared_error(y_true, y_pred))
    out = {
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": float(skm.mean_absolute_error(y_true, y_pred)),
        "r2": None,
        "support": n,
    }
    if n >= 2 and float(np.ptp(y_true, axis=0).min()) > 0:
        out["r2"] = float(skm.r2_score(y_true, y_pred))
    return out


def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood in nats), capped so it never overflows to inf."""
    mean_nll = float(mean_nll)
    if math.isnan(mean_nll):
        return float("nan")
    return float(math.exp(min(mean_nll, _MAX_LOG_PERPLEXITY)))


def _has_cjk(texts: list[str]) -> bool:
    return any("\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff" for t in texts for ch in t)


def generation_metrics(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF (sacrebleu, the scores papers report) and the exact-match rate of generated
    texts against one reference each.

    BLEU splits Chinese into characters (sacrebleu's ``zh`` tokenizer) when the references hold CJK
    text, else uses its standard ``13a``; the tokenizer is named in the result. chrF (character 6-grams)
    needs no tokenizer, so it suits both languages. Scores are on sacrebleu's 0-100 scale.
    """
    import sacrebleu  # a pure-Python dependency; imported here so the metric module loads light

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not references:
        return {"bleu": None, "chrf": None, "exact_match": None, "bleu_tokenize": None, "support": 0}
    tokenize = "zh" if _has_cjk(references) else "13a"
    bleu = sacrebleu.corpus_bleu(hypotheses, [references], tokenize=tokenize)
    chrf = sacrebleu.corpus_chrf(hypotheses, [references])
    exact = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True))
    return {
        "bleu": float(bleu.score),
        "chrf": float(chrf.score),
        "exact_match": exact / len(references),
        "bleu_tokenize": tokenize,
        "support": len(references),
    }
