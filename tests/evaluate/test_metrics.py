"""Tests for largo.evaluate.metrics against small hand-computed examples."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from largo.evaluate.metrics import classification_metrics, generation_metrics, perplexity, regression_metrics

LABELS = ["cat", "dog", "bird"]
# true:  0 0 0 1 1 2
# pred:  0 0 1 1 0 2
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 0, 1, 1, 0, 2])


def test_accuracy_and_confusion_matrix_exact() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, LABELS)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert m["labels"] == LABELS
    assert m["support"] == 6


def test_macro_f1_matches_manual_computation() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, LABELS)
    # cat: p=2/3 r=2/3; dog: p=1/2 r=1/2; bird: p=1 r=1
    f1 = [2 / 3, 1 / 2, 1.0]
    assert m["f1_macro"] == pytest.approx(sum(f1) / 3)
    assert m["precision_macro"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["f1_weighted"] == pytest.approx((3 * f1[0] + 2 * f1[1] + 1 * f1[2]) / 6)
    # micro scores equal accuracy for single-label classification
    assert m["f1_micro"] == pytest.approx(4 / 6)
    assert m["per_class"]["dog"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})


def test_absent_class_appears_with_zero_scores() -> None:
    labels = ["a", "b", "c", "never"]
    m = classification_metrics(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 1]), labels)
    assert set(m["per_class"]) == set(labels)
    assert m["per_class"]["never"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert len(m["confusion_matrix"]) == 4 and all(len(row) == 4 for row in m["confusion_matrix"])
    assert m["confusion_matrix"][3] == [0, 0, 0, 0]


def test_probability_metrics_are_finite_and_safe() -> None:
    probs = np.array(
        [
            [1.0, 0.0, 0.0],  # exact zeros must not give inf
            [0.7, 0.3, 0.0],
            [0.2, 0.5, 0.3],
            [0.1, 0.9, 0.0],
            [0.6, 0.4, 0.0],
            [0.0, 0.0, 1.0],
        ]
    )
    m = classification_metrics(Y_TRUE, Y_PRED, LABELS, probs=probs)
    assert math.isfinite(m["log_loss"]) and m["log_loss"] > 0
    # top-2 hits: rows 0,1 (cat in top2), row 2 (cat 0.2 is third -> miss), rows 3,4 (dog in top2), 5
    assert m["top2_accuracy"] == pytest.approx(5 / 6)


def test_top2_omitted_for_binary_and_log_loss_exact() -> None:
    probs = np.array([[0.8, 0.2], [0.4, 0.6]])
    m = classification_metrics(np.array([0, 1]), np.array([0, 1]), ["no", "yes"], probs=probs)
    assert "top2_accuracy" not in m
    assert m["log_loss"] == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)


def test_results_are_json_serializable_plain_types() -> None:
    probs = np.full((6, 3), 1 / 3)
    m = classification_metrics(Y_TRUE, Y_PRED, LABELS, probs=probs)
    text = json.dumps(m)
    assert json.loads(text)["accuracy"] == pytest.approx(4 / 6)
    assert type(m["accuracy"]) is float and type(m["per_class"]["cat"]["support"]) is int
    assert type(m["confusion_matrix"][0][0]) is int
    json.dumps(regression_metrics(np.array([1.0, 2.0]), np.array([1.5, 2.5])))


def test_regression_metrics_exact() -> None:
    y_true = np.array([1.0, 2.0, 3.0, 4.0])
    y_pred = np.array([1.0, 3.0, 2.0, 4.0])
    m = regression_metrics(y_true, y_pred)
    assert m["mse"] == pytest.approx(0.5)
    assert m["rmse"] == pytest.approx(math.sqrt(0.5))
    assert m["mae"] == pytest.approx(0.5)
    # ss_res = 2, ss_tot = 5 -> r2 = 1 - 2/5
    assert m["r2"] == pytest.approx(0.6)
    assert m["support"] == 4
    assert all(type(m[k]) is float for k in ("mse", "rmse", "mae", "r2"))


def test_r2_none_when_undefined() -> None:
    assert regression_metrics(np.array([2.0, 2.0, 2.0]), np.array([1.0, 2.0, 3.0]))["r2"] is None
    single = regression_metrics(np.array([2.0]), np.array([3.0]))
    assert single["r2"] is None and single["mse"] == pytest.approx(1.0)


def test_regression_accepts_column_vectors() -> None:
    m = regression_metrics(np.array([[1.0], [2.0]]), np.array([1.0, 2.0]))
    assert m["mse"] == 0.0 and m["r2"] == pytest.approx(1.0)


def test_perplexity_exact_and_capped() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    big = perplexity(1e6)
    assert math.isfinite(big) and type(big) is float


def test_generation_metrics_split_chinese_into_characters() -> None:
    refs = ["今天天气很好", "我们去公园"]
    perfect = generation_metrics(refs, refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    assert perfect["exact_match"] == 1.0 and perfect["bleu_tokenize"] == "zh" and perfect["support"] == 2
    # one character wrong: with words (13a) a whole "word" would be lost, by characters only one of six
    near = generation_metrics(["今天天气很坏", "我们去公园"], refs)
    assert 60 < near["bleu"] < 100 and near["exact_match"] == 0.5


def test_generation_metrics_english_and_edge_cases() -> None:
    m = generation_metrics(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert m["bleu_tokenize"] == "13a" and 0 < m["bleu"] < 100 and 0 < m["chrf"] < 100
    assert generation_metrics([], [])["bleu"] is None
    assert generation_metrics([" a b "], ["a b"])["exact_match"] == 1.0  # outer spaces do not count
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        generation_metrics(["a", "b"], ["a"])
