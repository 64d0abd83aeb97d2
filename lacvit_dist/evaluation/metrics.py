"""Classification and embedding-health metrics: pure torch, any device, no collectives.

Everything here works on the device of its inputs, in fp32 for bf16/fp16/fp32 inputs and fp64 for fp64
inputs (:func:`compute_dtype`), and reads nothing back to the host unless the result is a Python number
(the functions that return ``float`` or ``dict[str, float]``). Nothing here talks to other ranks: the
docstrings say what a distributed caller gathers or sums.

Classification
--------------
* :func:`topk_correct` -- Top-k hit COUNTS (sum them over batches and ranks, divide once at the end).
* :func:`top1_predictions` -- per-row predictions for the confusion matrix under the same rule as Top-1.
* :func:`confusion_matrix` -- ``[C, C]`` int64 counts, rows = true class, columns = predicted class.
* :func:`per_class_accuracy` -- recall per class and its support; classes without samples are 0 and
  flagged by ``support == 0`` (never NaN). :func:`balanced_accuracy` averages over present classes only.
* :func:`knn_predict` / :func:`knn_correct` / :func:`knn_accuracy` -- the weighted kNN monitor of
  Wu et al. 2018 (InstDisc) as used by DINO.
* :func:`pr_histograms` / :func:`pr_curves` -- one-vs-rest precision-recall curves per class from summable
  per-threshold counts (TensorBoard's PR-curve binning).

Embedding health of one matrix ``X [N, D]``
-------------------------------------------
* :func:`mean_pairwise_cosine` -- mean cosine similarity over pairs ``i != j``: ~0 spread, 1 collapsed.
* :func:`isotropy_partition` -- partition-function isotropy (Arora et al. 2016; Mu & Viswanath 2018):
  1 isotropic, small anisotropic.
* :func:`effective_rank` -- Roy & Vetterli 2007: between 1 (rank one) and ``min(N, D)``.
* :func:`alignment` / :func:`uniformity` -- Wang & Isola 2020, on L2-normalised features.
* :func:`embedding_health` -- all of the above as a ``dict[str, float]`` for logging.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "compute_dtype", "topk_correct", "top1_predictions", "confusion_matrix", "per_class_accuracy", "balanced_accuracy",
    "knn_predict", "knn_correct", "knn_accuracy", "mean_pairwise_cosine", "isotropy_partition",
    "effective_rank", "alignment", "uniformity", "same_class_pairs", "embedding_health", "pr_histograms",
    "pr_curves",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 (and integer) inputs, fp64 for fp64 inputs."""
    if not dtype.is_floating_point:
        return torch.float32
    return torch.promote_types(dtype, torch.float32)


def _as_matrix(x: Tensor, name: str) -> Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] tensor, got shape {tuple(x.shape)}")
    return x.to(compute_dtype(x.dtype))


# --------------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------------
def topk_correct(logits: Tensor, labels: Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, Tensor]:
    """Number of rows whose true class is among the ``k`` highest logits, for each ``k`` in ``ks``.

    ``logits`` [N, C], ``labels`` [N] int in ``[0, C)``. Returns ``{k: 0-dim int64 tensor}`` keyed by the
    REQUESTED ``k``; the ``k`` actually used is ``min(k, C)`` (so ``{5: ...}`` on 3 classes counts every
    row). Counts, not fractions: sum them over batches (and all-reduce over ranks), divide once.

    Rule: row ``i`` is a top-k hit iff ``#{c : logits[i, c] >= logits[i, y_i]} <= k`` (the true class
    included). Without ties this is exactly "``y_i`` is in ``logits.topk(k)``"; a tie with the true class
    counts AGAINST it (pessimistic, deterministic), so a model with constant logits scores 0 at top-1
    instead of whatever ``topk``'s tie order gives. A row with any NaN logit is never a hit. O(N x C), no sort,
    no host sync.
    """
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {ks}")
    rank = _true_class_rank(logits, labels)
    return {k: (rank <= min(k, logits.shape[1])).sum() for k in ks}


def _true_class_rank(logits: Tensor, labels: Tensor) -> Tensor:
    """``#{c : logits[i, c] >= logits[i, y_i]}`` per row (1 = strictly the best), ``C + 1`` for a row with
    a NaN logit (never a hit): :func:`topk_correct`'s rule."""
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"expected logits [N, C] and labels [N], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    true = logits.gather(1, labels.long()[:, None])  # [N, 1]
    rank = (logits >= true).sum(dim=1)
    return torch.where(torch.isnan(logits).any(dim=1), torch.full_like(rank, logits.shape[1] + 1), rank)


def top1_predictions(logits: Tensor, labels: Tensor) -> Tensor:
    """Predicted class per row for :func:`confusion_matrix`, consistent with ``topk_correct(k=1)``: the true
    class for a Top-1 hit, otherwise the best OTHER class (a tied rival, a NaN column; ties between rivals go
    to the first after the true class, cyclically). So the diagonal counts exactly the Top-1 hits, where a
    plain ``argmax`` would put tied and NaN rows on it. int64 ``[N]``; with one class there is no other
    column, and every row is predicted as its class."""
    hit = _true_class_rank(logits, labels) == 1
    labels = labels.long()
    num_classes = logits.shape[1]
    offsets = torch.arange(1, max(num_classes, 2), device=labels.device)
    others = (labels[:, None] + offsets) % num_classes  # [N, C - 1]: every class but the true one
    rival = others.gather(1, logits.gather(1, others).argmax(dim=1, keepdim=True)).squeeze(1)
    return torch.where(hit, labels, rival)


def confusion_matrix(preds: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``[C, C]`` int64 counts: ``M[t, p]`` = number of samples with true class ``t`` predicted as ``p``.

    ``preds`` and ``labels`` are integer tensors of the same shape (any shape; flattened). Pairs where
    either value is outside ``[0, C)`` (e.g. an ``ignore_index`` of -100) are NOT counted: ``M.sum()``
    says how many were. Built with one ``torch.bincount`` (``labels * C + preds``, invalid pairs sent to
    an extra bin that is dropped). On CUDA, ``bincount`` reads its input's maximum, one host sync. Sum the
    matrices of all batches / ranks (int64 all-reduce) for the split's matrix.
    """
    if preds.shape != labels.shape:
        raise ValueError(f"preds and labels must have the same shape, got {tuple(preds.shape)} and "
                         f"{tuple(labels.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    preds, labels = preds.reshape(-1).long(), labels.reshape(-1).long()
    c = num_classes
    valid = (preds >= 0) & (preds < c) & (labels >= 0) & (labels < c)
    index = torch.where(valid, labels * c + preds, torch.full_like(preds, c * c))
    return torch.bincount(index, minlength=c * c + 1)[: c * c].reshape(c, c)


def per_class_accuracy(confusion: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class accuracy (recall) and support from a confusion matrix (rows = true class).

    Returns ``(accuracy, support)``: ``support[c] = M[c, :].sum()`` (int64) and
    ``accuracy[c] = M[c, c] / support[c]`` (fp64), with ``accuracy[c] = 0.0`` where ``support[c] == 0``.
    The result is never NaN; a class absent from the split is recognised by ``support == 0`` (not by its
    accuracy), and must be left out of any mean (see :func:`balanced_accuracy`) and drawn as "n/a".
    """
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square [C, C] matrix, got {tuple(confusion.shape)}")
    support = confusion.sum(dim=1).long()
    hits = confusion.diagonal().to(torch.float64)
    accuracy = hits / support.clamp(min=1).to(torch.float64)
    return torch.where(support > 0, accuracy, torch.zeros_like(accuracy)), support


def balanced_accuracy(confusion: Tensor) -> Tensor:
    """Mean per-class accuracy over the classes PRESENT in the matrix (``support > 0``); 0-dim fp64.

    NaN only if no class has a sample (an empty matrix has no accuracy).
    """
    accuracy, support = per_class_accuracy(confusion)
    present = support > 0
    return (accuracy * present).sum() / present.sum()


def knn_predict(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, *, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None, chunk_size: int = 256) -> Tensor:
    """Weighted k-nearest-neighbour class prediction for every test row; int64 ``[N_test]``.

    The monitor of Wu et al. 2018 (InstDisc) and DINO (Caron et al. 2021, ``eval_knn.py``): rows are
    L2-normalised, ``s_ij = cos(test_i, train_j)``; the ``k`` most similar training rows (``k`` clipped to
    ``N_train``) vote for their label with weight ``exp(s_ij / T)``; the class with the largest summed
    weight wins (ties: the lowest class index). Each row's weights are computed as
    ``exp((s_ij - max_j s_ij) / T)``, which scales the row's votes by a constant (same winner) and cannot
    overflow at small ``T``.

    Test rows are processed ``chunk_size`` at a time, so memory is
    ``O(chunk_size x (N_train + k x C))``, never ``N_test x N_train``; each row's result does not depend on
    the chunking. ``num_classes`` defaults to ``train_labels.max() + 1`` (one host sync).
    """
    train = F.normalize(_as_matrix(train_feats, "train_feats"), dim=1)
    test = F.normalize(_as_matrix(test_feats, "test_feats"), dim=1).to(train.dtype)
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train and test features differ in width: {train.shape[1]} vs {test.shape[1]}")
    if train_labels.shape != (train.shape[0],):
        raise ValueError(f"train_labels must be [{train.shape[0]}], got {tuple(train_labels.shape)}")
    if train.shape[0] == 0:
        raise ValueError("kNN needs at least one training row")
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(f"need k >= 1, temperature > 0 and chunk_size >= 1, got {k}, {temperature}, "
                         f"{chunk_size}")
    train_labels = train_labels.to(train.device).long()
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    k = min(k, train.shape[0])
    preds = []
    for start in range(0, test.shape[0], chunk_size):
        sim = test[start:start + chunk_size] @ train.T  # [b, N_train]
        top_sim, top_idx = sim.topk(k, dim=1)  # sorted, descending
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # [b, k], in (0, 1]
        votes = F.one_hot(train_labels[top_idx], num_classes).to(weights.dtype)  # [b, k, C]
        scores = (votes * weights[:, :, None]).sum(dim=1)  # [b, C]; a fixed-order sum, deterministic
        preds.append(scores.argmax(dim=1))
    if not preds:
        return torch.zeros(0, dtype=torch.long, device=train.device)
    return torch.cat(preds)


def knn_correct(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor, *,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                chunk_size: int = 256) -> Tensor:
    """Number of test rows whose :func:`knn_predict` prediction equals their label; 0-dim int64, no sync.

    Distributed use: the caller all-gathers the TRAINING features and labels (every rank needs the whole
    memory bank), keeps its own test rows local, calls this, and all-reduces (sums) the count and the
    number of test rows: every test sample is counted exactly once. Pass ``num_classes`` explicitly there so
    that no rank infers a different class count from its data.
    """
    preds = knn_predict(train_feats, train_labels, test_feats, k=k, temperature=temperature,
                        num_classes=num_classes, chunk_size=chunk_size)
    if test_labels.shape != preds.shape:
        raise ValueError(f"test_labels must be [{preds.shape[0]}], got {tuple(test_labels.shape)}")
    return (preds == test_labels.to(preds.device).long()).sum()


def knn_accuracy(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor, *,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk_size: int = 256) -> float:
    """Fraction of test rows classified correctly by the weighted kNN of :func:`knn_predict`.

    Single-process convenience: ``knn_correct(...) / N_test`` (one host sync). For several ranks, sum
    :func:`knn_correct` and the test-row counts over ranks instead.
    """
    if test_feats.shape[0] == 0:
        raise ValueError("kNN accuracy needs at least one test row")
    correct = knn_correct(train_feats, train_labels, test_feats, test_labels, k=k, temperature=temperature,
                          num_classes=num_classes, chunk_size=chunk_size)
    return correct.item() / test_feats.shape[0]


# --------------------------------------------------------------------------------------------------------
# Embedding health
# --------------------------------------------------------------------------------------------------------
def mean_pairwise_cosine(x: Tensor) -> Tensor:
    """Mean cosine similarity over the ``N (N - 1)`` ordered pairs ``i != j``; 0-dim, fp64.

    With ``u_i = x_i / ||x_i||`` and ``s = sum_i u_i``:
    ``sum_{i != j} u_i . u_j = ||s||^2 - sum_i ||u_i||^2``, so this is O(N x D) time and O(D) extra memory,
    no ``N x N`` matrix (accumulated in fp64 against cancellation). All-zero rows count as cosine 0 with
    everything. ~0 for spread (isotropic, zero-mean) embeddings, 1 for collapsed ones, negative at most
    ``-1 / (N - 1)``. Needs ``N >= 2``.
    """
    x = _as_matrix(x, "x")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"mean pairwise cosine needs at least 2 rows, got {n}")
    u = F.normalize(x, dim=1).double()
    s = u.sum(dim=0)
    return (s.dot(s) - u.square().sum()) / (n * (n - 1))


def _gram_eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of ``X^T X`` [D, D] in fp64: (eigenvalues ascending, eigenvectors as columns)."""
    xd = x.double()
    return torch.linalg.eigh(xd.T @ xd)


def isotropy_partition(x: Tensor, *, normalize: bool = True) -> Tensor:
    """Partition-function isotropy of the rows of ``x`` [N, D]; 0-dim fp64 in ``(0, 1]``.

    Arora et al. 2016 ("A latent variable model approach to PMI-based word embeddings") define the
    partition function ``Z(c) = sum_i exp(c . x_i)`` for unit vectors ``c``; Mu & Viswanath 2018
    ("All-but-the-Top") measure isotropy as ``I(X) = min_c Z(c) / max_c Z(c)``, approximating the min and
    max over the unit sphere by the set of eigenvectors of ``X^T X``. Eigenvectors are only defined up to
    sign, and ``Z(c) != Z(-c)`` whenever the embeddings have a nonzero mean, so BOTH signs of every
    eigenvector are used (2D candidate directions): the value is then well defined and does not depend on
    the eigen-solver. Computed as ``exp(min log Z - max log Z)`` with log-sum-exp in fp64 (no overflow).

    ``I = 1``: every direction carries the same mass (isotropic); ``I -> 0``: a dominant direction
    (e.g. a common mean vector). With ``normalize=True`` (default) the rows are L2-normalised first, which
    makes the measure independent of the features' scale (backbone features and normalised projections are
    comparable); then ``|c . x_i| <= 1`` bounds it below by ``e^-2 ~= 0.135`` (all rows identical). With
    ``normalize=False`` it is Mu & Viswanath's raw form: identical rows ``m`` give ``exp(-2 ||m||)``.
    Cost: O(N D^2 + D^3).
    """
    x = _as_matrix(x, "x")
    if x.shape[0] < 1:
        raise ValueError("isotropy needs at least one row")
    if normalize:
        x = F.normalize(x, dim=1)
    xd = x.double()
    _, vectors = _gram_eigh(xd)
    proj = xd @ vectors  # [N, D]: c_k . x_i
    log_z = torch.cat([torch.logsumexp(proj, dim=0), torch.logsumexp(-proj, dim=0)])
    return (log_z.min() - log_z.max()).exp()


def effective_rank(x: Tensor, *, center: bool = False) -> Tensor:
    """Effective rank of ``x`` [N, D] (Roy & Vetterli 2007); 0-dim fp64 in ``[1, min(N, D)]``.

    With singular values ``sigma_k`` of ``X`` and ``p_k = sigma_k / sum_j sigma_j``:
    ``erank(X) = exp(-sum_k p_k log p_k)`` (``0 log 0 = 0``). ``min(N, D)`` when all singular values are
    equal (isotropic), 1 for a rank-one matrix (collapsed: all rows parallel). Rows are used as given
    (uncentred, as in RankMe, Garrido et al. 2023), so a large common mean lowers it; ``center=True``
    subtracts the column mean first. The singular values come from the eigenvalues of ``X^T X`` in fp64
    of the smaller Gram matrix (``sigma = sqrt(max(lambda, 0))``), O(N D min(N, D)); an all-zero matrix
    returns 0 (no direction at all).
    """
    x = _as_matrix(x, "x")
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    xd = x.double()
    if xd.shape[0] < xd.shape[1]:  # the smaller Gram matrix has the same nonzero eigenvalues
        xd = xd.T
    sigma = torch.linalg.eigvalsh(xd.T @ xd).clamp(min=0).sqrt()
    total = sigma.sum()
    p = sigma / total.clamp(min=torch.finfo(torch.float64).tiny)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum()
    return torch.where(total > 0, entropy.exp(), torch.zeros_like(entropy))


def alignment(x: Tensor, y: Tensor, alpha: float = 2.0, *, normalize: bool = True) -> Tensor:
    """Alignment of positive pairs (Wang & Isola 2020): ``mean_i ||x_i - y_i||_2^alpha``; 0-dim.

    ``x`` [N, D] and ``y`` [N, D] are the two sides of N positive pairs. Rows are L2-normalised first
    (``normalize=True``, the paper's setting: features on the unit hypersphere), so the value lies in
    ``[0, 2^alpha]``; lower is better, 0 for identical pairs.
    """
    x, y = _as_matrix(x, "x"), _as_matrix(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if normalize:
        x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    return (x - y).norm(dim=1).pow(alpha).mean()


def _subsample(x: Tensor, max_samples: int | None, seed: int) -> Tensor:
    """At most ``max_samples`` rows of ``x``, drawn without replacement by a CPU generator seeded with
    ``seed`` (the same rows on every device and every run)."""
    if max_samples is None or x.shape[0] <= max_samples:
        return x
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(x.shape[0], generator=gen)[:max_samples].sort().values
    return x[index.to(x.device)]


def uniformity(x: Tensor, t: float = 2.0, *, normalize: bool = True, chunk_size: int = 1024,
               max_samples: int | None = None, seed: int = 0) -> Tensor:
    """Uniformity (Wang & Isola 2020): ``log( mean_{i<j} exp(-t ||x_i - x_j||^2) )``; 0-dim.

    0 (its maximum) when all rows coincide, more negative the more uniformly the rows cover the sphere
    (about ``-2t`` for many points spread over a high-dimensional sphere). Rows are L2-normalised first
    (``normalize=True``, the paper's setting).

    Exact over all ``N (N - 1) / 2`` pairs, in blocks of ``chunk_size`` rows against all later rows, each
    block reduced to one log-sum-exp: memory about two ``chunk_size x N`` matrices (N = 50k, fp32,
    chunk 1024: ~0.4 GB), time ``O(N^2 D)`` (N = 50k, D = 1k is ~1.3 TFLOP:
    seconds on a GPU, slow on a CPU). ``max_samples`` caps N by a seeded random subset of rows
    (``torch.Generator().manual_seed(seed)``, reproducible on every device); the result is then an unbiased
    estimate of the pair mean inside the log. Needs at least 2 rows.
    """
    x = _as_matrix(x, "x")
    x = _subsample(x, max_samples, seed)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 rows, got {n}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if normalize:
        x = F.normalize(x, dim=1)
    sq = x.square().sum(dim=1)
    parts = []
    for start in range(0, n - 1, chunk_size):
        stop = min(start + chunk_size, n - 1)  # the last row has no later partner
        b = stop - start
        # Rows i in [start, stop) against columns j in [start + 1, n): ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j.
        logits = torch.addmm(sq[start:stop, None] + sq[None, start + 1:], x[start:stop], x[start + 1:].T,
                             alpha=-2.0).clamp_(min=0).mul_(-t)
        # Column q is j = start + 1 + q and row r is i = start + r: j > i iff q >= r. Only the first b
        # columns can break it (a b x b block, below its diagonal).
        below = torch.ones(b, b, dtype=torch.bool, device=x.device).tril_(-1)
        logits[:, :b].masked_fill_(below, -math.inf)
        parts.append(torch.logsumexp(logits.reshape(-1), dim=0))
        del logits
    return torch.logsumexp(torch.stack(parts), dim=0) - math.log(n * (n - 1) / 2)


def same_class_pairs(labels: Tensor, max_pairs: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random same-class pairs ``(i, j)``, ``i != j``: up to ``max_pairs`` index tensors (int64, CPU).

    Each pair starts from a distinct anchor ``i`` drawn without replacement from the rows whose class has at
    least 2 rows; its partner ``j`` is drawn uniformly from the OTHER rows of the same class. A CPU
    ``torch.Generator`` seeded with ``seed`` makes the pairs reproducible on any device. Empty tensors when
    no class has two rows.
    """
    labels = labels.reshape(-1).long().cpu()
    gen = torch.Generator().manual_seed(seed)
    order = torch.argsort(labels, stable=True)  # rows grouped by class
    sorted_labels = labels[order]
    _, inverse, counts = torch.unique_consecutive(sorted_labels, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(order)
    position[order] = torch.arange(labels.numel())  # where each row sits in `order`
    group_size = counts[inverse]  # per sorted position
    eligible = order[group_size >= 2]  # row indices with a same-class partner
    if eligible.numel() == 0 or max_pairs < 1:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    anchors = eligible[torch.randperm(eligible.numel(), generator=gen)[:max_pairs]]
    pos = position[anchors]
    group = inverse[pos]
    offset = (torch.rand(anchors.numel(), generator=gen, dtype=torch.float64)
              * (counts[group] - 1).double()).long().clamp(max=counts[group] - 2)
    partner_pos = starts[group] + offset
    partner_pos = partner_pos + (partner_pos >= pos).long()  # skip the anchor itself
    return anchors, order[partner_pos]


def embedding_health(x: Tensor, labels: Tensor | None = None, *, max_samples: int = 8192,
                     max_pairs: int = 8192, seed: int = 0) -> dict[str, float]:
    """Health report of an embedding matrix ``x`` [N, D] (N >= 2); ``dict[str, float]`` for logging.

    Keys: ``mean_norm`` (mean row L2 norm, a collapse-to-zero / blow-up check), ``mean_cosine``
    (:func:`mean_pairwise_cosine`, all rows), ``isotropy`` (:func:`isotropy_partition`, normalised rows,
    all rows), ``effective_rank`` (:func:`effective_rank`, uncentred, all rows) and
    ``effective_rank_ratio`` (divided by ``min(N, D)``), ``uniformity`` (:func:`uniformity`, ``t = 2`` on at
    most ``max_samples`` seeded random rows). With ``labels`` [N], also ``alignment``
    (:func:`alignment`, ``alpha = 2``) over up to ``max_pairs`` seeded same-class pairs
    (:func:`same_class_pairs`), or NaN when no class has two rows. Everything is reproducible from ``seed``.
    One host sync per value (this is a reporting function, not for the training hot path).
    """
    x = _as_matrix(x, "x")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"embedding health needs at least 2 rows, got {n}")
    erank = effective_rank(x)
    out = {
        "mean_norm": x.norm(dim=1).mean().item(),
        "mean_cosine": mean_pairwise_cosine(x).item(),
        "isotropy": isotropy_partition(x).item(),
        "effective_rank": erank.item(),
        "effective_rank_ratio": erank.item() / min(n, d),
        "uniformity": uniformity(x, 2.0, max_samples=max_samples, seed=seed).item(),
    }
    if labels is not None:
        if labels.shape != (n,):
            raise ValueError(f"labels must be [{n}], got {tuple(labels.shape)}")
        i, j = same_class_pairs(labels, max_pairs, seed=seed)
        if i.numel() == 0:
            out["alignment"] = math.nan
        else:
            i, j = i.to(x.device), j.to(x.device)
            out["alignment"] = alignment(x[i], x[j], 2.0).item()
    return out


# --------------------------------------------------------------------------------------------------------
# Precision-recall curves
# --------------------------------------------------------------------------------------------------------
def pr_histograms(probs: Tensor, labels: Tensor, num_thresholds: int = 127) -> Tensor:
    """Per-class one-vs-rest score histograms: ``[2, C, T]`` int64, ``[0]`` positives, ``[1]`` negatives.

    ``probs`` [N, C] are class probabilities in ``[0, 1]``, ``labels`` [N]. Row ``i`` counts as a positive of
    class ``labels[i]`` and a negative of every other class, in bucket ``floor(p * (T - 1))`` (TensorBoard's
    PR-curve binning). Counts, not curves: sum them over batches and ranks (one int64 all-reduce of
    ``2 x C x T``, never the scores themselves), then :func:`pr_curves`.
    """
    if probs.dim() != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"expected probs [N, C] and labels [N], got {tuple(probs.shape)} and {tuple(labels.shape)}")
    n, c = probs.shape
    bucket = (probs.float().clamp(0, 1) * (num_thresholds - 1)).floor().long()  # [N, C]
    positive = F.one_hot(labels.long(), c).bool()
    index = torch.arange(c, device=probs.device) * num_thresholds + bucket  # [N, C]: class-major bins
    size = c * num_thresholds
    pos = torch.bincount(index[positive], minlength=size)
    neg = torch.bincount(index[~positive], minlength=size)
    return torch.stack([pos, neg]).reshape(2, c, num_thresholds)


def pr_curves(histograms: Tensor) -> dict[str, Tensor]:
    """Counts and curves from :func:`pr_histograms`: ``tp, fp, tn, fn, precision, recall``, each
    ``[C, T]`` fp64, at threshold ``t / (T - 1)`` for ``t = 0..T-1`` (a score counts as predicted positive
    when its bucket is ``>= t``), exactly as TensorBoard's ``add_pr_curve`` computes them from raw scores."""
    pos, neg = histograms.double()
    tp = pos.flip(-1).cumsum(-1).flip(-1)
    fp = neg.flip(-1).cumsum(-1).flip(-1)
    tn, fn = fp[..., :1] - fp, tp[..., :1] - tp
    tiny = 1e-7  # TensorBoard's minimum count: an empty denominator gives 0, not NaN
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": tp / (tp + fp).clamp(min=tiny),
            "recall": tp / (tp + fn).clamp(min=tiny)}
