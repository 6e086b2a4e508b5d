"""evaluate.metrics against independent computations (sklearn, brute-force loops)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score, top_k_accuracy_score

from evaluate import metrics


@pytest.mark.parametrize("seed", [0, 1])
def test_topk_accuracy_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c = 300, 12
    logits = rng.normal(size=(n, c))
    labels = rng.integers(0, c, n)
    labels[:c] = np.arange(c)  # every class present (sklearn infers the class set from y_true)
    for k in (1, 5):
        want = top_k_accuracy_score(labels, logits, k=k, labels=np.arange(c))
        assert metrics.topk_accuracy(logits, labels, k) == pytest.approx(want)
        top = metrics.topk_indices(logits, 5)
        assert metrics.topk_accuracy_from_indices(top, labels, k, c) == pytest.approx(want)
    # best-first order of the top-k indices
    top = metrics.topk_indices(logits, 5)
    np.testing.assert_array_equal(top, np.argsort(-logits, axis=1)[:, :5])


def test_top5_is_nan_below_five_classes() -> None:
    logits = np.random.default_rng(0).normal(size=(10, 3))
    assert np.isnan(metrics.topk_accuracy(logits, np.zeros(10, int), 5))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mean_per_class_recall_matches_sklearn_and_confusion_matrix(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c = 400, 9
    labels = rng.integers(0, c, n)
    preds = np.where(rng.random(n) < 0.4, labels, rng.integers(0, c, n))
    got = metrics.mean_per_class_recall(preds, labels, c)
    assert got == pytest.approx(balanced_accuracy_score(labels, preds))
    # MetaCLIP's definition: mean of diag / row sums of the confusion matrix
    m = np.zeros((c, c))
    for y, p in zip(labels, preds):
        m[y, p] += 1
    assert got == pytest.approx(np.mean(np.diag(m) / m.sum(1)))


@pytest.mark.parametrize("ties", [False, True])
def test_roc_auc_matches_sklearn(ties: bool) -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(250, 2))
    if ties:
        logits = np.round(logits, 1)
    labels = rng.integers(0, 2, 250)
    score = metrics.binary_margin(logits)
    np.testing.assert_allclose(score, logits[:, 1] - logits[:, 0])
    assert metrics.roc_auc(score, labels) == pytest.approx(roc_auc_score(labels, score))
    assert np.isnan(metrics.roc_auc(score, np.ones(250)))


def test_classification_metrics_headline() -> None:
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(100, 7))
    labels = rng.integers(0, 7, 100)
    top = metrics.topk_indices(logits, 5)
    m = metrics.classification_metrics(top, labels, 7, "top1_top5_mean")
    assert m["score"] == pytest.approx((m["top1"] + m["top5"]) / 2)
    m2 = metrics.classification_metrics(metrics.topk_indices(logits[:, :2], 2), labels % 2, 2, "roc_auc",
                                        metrics.binary_margin(logits[:, :2]))
    assert m2["score"] == pytest.approx(roc_auc_score(labels % 2, logits[:, 1] - logits[:, 0]))
    pct = metrics.to_percent({"top1": 0.5, "x_mean_rank": 3.0, "num_examples": 10.0})
    assert pct == {"top1": 50.0, "x_mean_rank": 3.0, "num_examples": 10.0}


def brute_force_recall(scores: np.ndarray, owner: np.ndarray, k: int) -> tuple[float, float]:
    """CLIP_benchmark's procedure: top-k per query, per-query recall binarised, averaged."""
    n_img, n_txt = scores.shape
    i2t_hits = []
    for i in range(n_img):
        top = np.argsort(-scores[i])[:k]
        positives = {j for j in range(n_txt) if owner[j] == i}
        recall = len(positives & set(top.tolist())) / len(positives)
        i2t_hits.append(recall > 0)
    t2i_hits = []
    for j in range(n_txt):
        top = np.argsort(-scores[:, j])[:k]
        t2i_hits.append(owner[j] in top.tolist())
    return float(np.mean(i2t_hits)), float(np.mean(t2i_hits))


@pytest.mark.parametrize("seed", [0, 1])
def test_multi_caption_recall_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_img = 30
    per = rng.integers(1, 6, n_img)                      # 1..5 captions per image
    owner = np.repeat(np.arange(n_img), per)
    img = rng.normal(size=(n_img, 8))
    txt = img[owner] + 1.5 * rng.normal(size=(len(owner), 8))
    scores = img @ txt.T
    i2t, t2i = metrics.retrieval_ranks(scores, owner)
    m = metrics.retrieval_metrics(i2t, t2i, ks=(1, 5, 10))
    for k in (1, 5, 10):
        want_i2t, want_t2i = brute_force_recall(scores, owner, k)
        assert m[f"image_to_text_R@{k}"] == pytest.approx(want_i2t)
        assert m[f"text_to_image_R@{k}"] == pytest.approx(want_t2i)
    assert m["mean_R@1"] == pytest.approx((m["image_to_text_R@1"] + m["text_to_image_R@1"]) / 2)
    # ranks are 0-based positions of the best positive
    for j in range(len(owner)):
        assert t2i[j] == np.argsort(-scores[:, j]).tolist().index(owner[j])
