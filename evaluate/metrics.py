"""Evaluation metrics in pure NumPy (spec ``evaluation.md`` §4).

Every function returns a fraction in [0, 1] (the evaluators report percent). Definitions:

- ``topk_accuracy``: acc@k = mean_n 1[y_n in top-k of L_n]; NaN when k exceeds the number of classes
  (CLIP_benchmark reports ``acc5 = NaN`` below 5 classes). ``topk_accuracy_from_indices`` takes the
  top-k class indices (as streamed from the device) instead of logits.
- ``mean_per_class_recall``: (1/C) sum_c M[c, c] / sum_c' M[c, c'] over the classes present in the labels,
  i.e. sklearn ``balanced_accuracy_score`` (MetaCLIP: mean of diag / row-sum of the confusion matrix).
- ``roc_auc``: the Mann-Whitney statistic with average ranks for ties (= sklearn ``roc_auc_score``);
  HatefulMemes scores it on ``L[:, 1] - L[:, 0]`` (``binary_margin``).
- ``kinetics_score``: (acc@1 + acc@5) / 2.
- Retrieval (§4.6) with several captions per image, ``S[i, j]`` = score of image i and caption j,
  ``owner[j]`` = the image of caption j:
  text->image rank of caption j = #{images i' != owner[j] : S[i', j] > S[owner[j], j]};
  image->text rank of image i = #{captions j not of i : S[i, j] > max over i's captions of S[i, j]}.
  Recall@k = mean(rank < k). The image->text hit is "any of its captions is in the top k", which is
  CLIP_benchmark's per-query recall binarised (> 0). Ties count in the query's favour (scores from float
  embeddings essentially never tie).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Metric of each MetaCLIP suite task (spec §3): everything else is top-1.
MEAN_PER_CLASS_TASKS = ("FGVCAircraft", "OxfordPets", "Caltech101", "Flowers102")


def topk_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits per row, best first: int [N, min(k, C)]."""
    logits = np.asarray(logits)
    k = min(k, logits.shape[1])
    part = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(logits, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def topk_accuracy_from_indices(top: np.ndarray, labels: np.ndarray, k: int,
                               num_classes: int | None = None) -> float:
    """acc@k from per-example top-k class indices ``top`` [N, >=k] (NaN if k > num_classes)."""
    top, labels = np.asarray(top), np.asarray(labels)
    if num_classes is not None and k > num_classes:
        return float("nan")
    if top.shape[1] < k:
        raise ValueError(f"need at least {k} top indices per example, got {top.shape[1]}")
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(np.any(top[:, :k] == labels[:, None], axis=1)))


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """acc@k from logits [N, C] and integer labels [N]; NaN when k > C."""
    logits = np.asarray(logits)
    if k > logits.shape[1]:
        return float("nan")
    return topk_accuracy_from_indices(topk_indices(logits, k), labels, k)


def confusion_matrix(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """M[c, c'] = #{n : y_n = c, pred_n = c'}."""
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (np.asarray(labels, np.int64), np.asarray(preds, np.int64)), 1)
    return m


def mean_per_class_recall(preds: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> float:
    """Mean over classes present in ``labels`` of per-class recall (balanced accuracy)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    c = int(max(preds.max(initial=0), labels.max(initial=0)) + 1) if num_classes is None else num_classes
    m = confusion_matrix(preds, labels, c)
    support = m.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(m)[present] / support[present]))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy ``rankdata(method="average")``)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start of each run of equal values
    new = np.r_[True, xs[1:] != xs[:-1]]
    run_id = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0          # mean of 1-based positions starts+1 .. ends
    ranks = np.empty(len(x), np.float64)
    ranks[order] = avg[run_id]
    return ranks


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive); NaN if one class."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def binary_margin(logits: np.ndarray) -> np.ndarray:
    """HatefulMemes score: ``L[:, 1] - L[:, 0]``."""
    logits = np.asarray(logits)
    return logits[:, 1] - logits[:, 0]


def kinetics_score(top1: float, top5: float) -> float:
    """Kinetics700: (acc@1 + acc@5) / 2."""
    return (top1 + top5) / 2.0


def classification_metrics(top: np.ndarray, labels: np.ndarray, num_classes: int, main: str = "top1",
                           margin: np.ndarray | None = None) -> dict[str, float]:
    """All classification metrics from top-k indices (k = min(5, C)), as fractions.

    ``main`` names the task's headline metric (``top1``, ``mean_per_class_recall``, ``top1_top5_mean``,
    ``roc_auc``), copied to the key ``score``. ``margin`` (L1 - L0) is needed for ``roc_auc``.
    """
    out = {
        "top1": topk_accuracy_from_indices(top, labels, 1, num_classes),
        "top5": topk_accuracy_from_indices(top, labels, 5, num_classes),
        "mean_per_class_recall": mean_per_class_recall(top[:, 0], labels, num_classes),
    }
    out["top1_top5_mean"] = kinetics_score(out["top1"], out["top5"])
    if margin is not None and num_classes == 2:
        out["roc_auc"] = roc_auc(margin, labels)
    if main not in out:
        raise ValueError(f"metric {main!r} not available (have {sorted(out)})")
    out["score"] = out[main]
    return out


# ----------------------------------------------------------------------------------------- retrieval

def best_own_scores(pos: np.ndarray, owner: np.ndarray, num_images: int) -> np.ndarray:
    """Per image, the best score among its own captions (``-inf`` for an image without captions)."""
    best = np.full(num_images, -np.inf, np.float64)
    np.maximum.at(best, np.asarray(owner, np.int64), np.asarray(pos, np.float64))
    return best


def retrieval_ranks(scores: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image->text ranks [num_images], text->image ranks [num_captions]) from the full ``scores``
    [num_images, num_captions] (0 = the best). See the module docstring for the definitions."""
    scores = np.asarray(scores)
    owner = np.asarray(owner, np.int64)
    n_img, n_txt = scores.shape
    own = owner[None, :] == np.arange(n_img)[:, None]
    pos = scores[owner, np.arange(n_txt)]
    t2i = np.sum((scores > pos[None, :]) & ~own, axis=0)
    best = best_own_scores(pos, owner, n_img)
    i2t = np.sum((scores > best[:, None]) & ~own, axis=1)
    return i2t.astype(np.int64), t2i.astype(np.int64)


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Fraction of queries whose rank is below k."""
    ranks = np.asarray(ranks)
    return float(np.mean(ranks < k)) if len(ranks) else float("nan")


def retrieval_metrics(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways, the DataComp score (mean of the two R@1) and mean / median ranks (1-based)."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = recall_at_k(i2t_ranks, k)
        out[f"text_to_image_R@{k}"] = recall_at_k(t2i_ranks, k)
    out["mean_R@1"] = (recall_at_k(i2t_ranks, 1) + recall_at_k(t2i_ranks, 1)) / 2
    out["image_to_text_mean_rank"] = float(np.mean(i2t_ranks) + 1)
    out["text_to_image_mean_rank"] = float(np.mean(t2i_ranks) + 1)
    out["image_to_text_median_rank"] = float(np.median(i2t_ranks) + 1)
    out["text_to_image_median_rank"] = float(np.median(t2i_ranks) + 1)
    return out


RATIO_KEYS = ("rank", "num_")  # metric names containing these are not fractions (not scaled to percent)


def to_percent(metrics: dict[str, float]) -> dict[str, float]:
    """Scale fraction metrics to percent (ranks and counts are left as they are)."""
    return {k: (v if any(r in k for r in RATIO_KEYS) else 100.0 * v) for k, v in metrics.items()}
