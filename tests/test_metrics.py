"""metrics.py against hand-computed cases and dense references (figures: tests/test_figures.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lacvit_dist.evaluation.metrics import (alignment, balanced_accuracy, confusion_matrix, effective_rank,
                                 embedding_health, isotropy_partition, knn_accuracy, knn_correct, knn_predict,
                                 mean_pairwise_cosine, per_class_accuracy, pr_curves, pr_histograms, same_class_pairs,
                                 top1_predictions, topk_correct, uniformity)
from lacvit_dist.evaluation.passes import at_least_one, embed_split, evaluate_classifier, evaluate_embeddings


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------------
def test_topk_correct_hand_table():
    logits = torch.tensor([[0.1, 0.7, 0.2, 0.0],   # order 1, 2, 0, 3
                           [0.5, 0.1, 0.3, 0.4],   # order 0, 3, 2, 1
                           [0.2, 0.3, 0.4, 0.1],   # order 2, 1, 0, 3
                           [0.9, 0.05, 0.03, 0.02]])  # order 0, 1, 2, 3
    labels = torch.tensor([1, 2, 0, 3])  # true-class ranks: 1, 3, 3, 4
    out = topk_correct(logits, labels, ks=(1, 2, 3, 5))
    assert {k: int(v) for k, v in out.items()} == {1: 1, 2: 1, 3: 3, 5: 4}  # k=5 clipped to 4 classes
    assert all(v.dtype == torch.int64 and v.dim() == 0 for v in out.values())
    # Same answer as topk membership when there are no ties, in fp64 too.
    x = torch.randn(64, 7, generator=gen(1), dtype=torch.float64)
    y = torch.randint(0, 7, (64,), generator=gen(2))
    for k in (1, 3):
        assert int(topk_correct(x, y, ks=(k,))[k]) == int((x.topk(k).indices == y[:, None]).any(1).sum())


def test_topk_correct_ties_and_nan_are_not_hits():
    constant = torch.zeros(4, 3)  # a dead model: every class tied
    assert int(topk_correct(constant, torch.tensor([0, 1, 2, 0]), ks=(1,))[1]) == 0
    assert int(topk_correct(constant, torch.tensor([0, 1, 2, 0]), ks=(3,))[3]) == 4
    nan_row = torch.tensor([[float("nan"), 1.0, 0.0]])
    assert int(topk_correct(nan_row, torch.tensor([1]), ks=(1,))[1]) == 0


def classify(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """evaluate_classifier on fixed logits: the "model" passes its input (the logits) through."""
    batches = [(logits[i:i + 4], labels[i:i + 4], []) for i in range(0, len(labels), 4)]
    return evaluate_classifier(torch.nn.Identity(), batches, torch.device("cpu"), torch.float32,
                               logits.shape[1], len(labels), "test")


def test_top1_follows_topk_rule_in_accuracy_and_confusion():
    """Top-1 and the confusion matrix use topk_correct's rule: ties count against the true class and a NaN row
    is never a hit, so neither lands on the diagonal (argmax would put them there), and Top-1 <= Top-5."""
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    dead = classify(torch.zeros(6, 3), labels)  # constant logits: argmax says class 0, i.e. 2 of 6 right
    assert dead["top1"] == 0.0 and dead["top5"] == 1.0 and dead["samples"] == 6
    assert sum(dead["confusion"][c][c] for c in range(3)) == 0 and dead["per_class_accuracy"] == [0.0] * 3
    assert dead["support"] == [2, 2, 2]

    nan_row = torch.tensor([[float("nan"), 1.0, 0.0], [0.0, 5.0, 1.0]])  # torch's argmax picks the NaN, class 0
    out = classify(nan_row, torch.tensor([0, 1]))
    assert out["top1"] == 0.5 and out["confusion"][0][0] == 0 and sum(out["confusion"][0]) == 1
    assert out["per_class_accuracy"] == [0.0, 1.0, 0.0] and out["support"] == [1, 1, 0]
    tie = torch.tensor([[2.0, 2.0, 0.0, 1.0]])  # true class 0 tied with class 1: recorded as class 1
    assert top1_predictions(tie, torch.tensor([0])).tolist() == [1]
    assert top1_predictions(torch.full((1, 3), -math.inf), torch.tensor([0])).tolist() != [0]

    logits = torch.randn(40, 7, generator=gen(3))  # no ties: plain argmax, as before
    labels = torch.randint(0, 7, (40,), generator=gen(4))
    out = classify(logits, labels)
    assert torch.equal(top1_predictions(logits, labels), logits.argmax(-1))
    assert out["top1"] == float((logits.argmax(-1) == labels).sum()) / 40
    assert out["confusion"] == confusion_matrix(logits.argmax(-1), labels, 7).tolist()


def test_confusion_matrix_known_predictions():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, -100])
    preds = torch.tensor([0, 1, 1, 1, 2, 0, 2, 1])  # the -100 label is ignored
    expected = torch.tensor([[1, 1, 0],
                             [0, 2, 1],
                             [1, 0, 1]])
    cm = confusion_matrix(preds, labels, 3)
    assert cm.dtype == torch.int64 and torch.equal(cm, expected)
    assert torch.equal(confusion_matrix(preds[None], labels[None], 3), expected)  # any shape, flattened
    with pytest.raises(ValueError):
        confusion_matrix(preds[:3], labels, 3)


def test_per_class_accuracy_with_absent_class():
    cm = torch.tensor([[3, 1, 0, 0],
                       [0, 0, 0, 0],   # class 1 has no samples
                       [1, 1, 2, 0],
                       [0, 0, 0, 5]])
    acc, support = per_class_accuracy(cm)
    assert torch.equal(support, torch.tensor([4, 0, 4, 5]))
    assert torch.allclose(acc, torch.tensor([0.75, 0.0, 0.5, 1.0], dtype=torch.float64))
    assert not torch.isnan(acc).any()
    assert float(balanced_accuracy(cm)) == pytest.approx((0.75 + 0.5 + 1.0) / 3)  # class 1 left out


def clusters(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    g = gen(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1) * 10
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(labels.numel(), dim, generator=g)
    return feats, labels


def test_knn_separated_clusters_are_perfect():
    train, train_y = clusters(30, 5, 16, 0.5, seed=0)
    test, test_y = clusters(10, 5, 16, 0.5, seed=0)  # same centres (same seed), fresh points below
    test = test + 0.1 * torch.randn(test.shape, generator=gen(9))
    assert knn_accuracy(train, train_y, test, test_y, k=20, num_classes=5) == 1.0
    assert int(knn_correct(train, train_y, test, test_y, k=20)) == 50


def test_knn_random_labels_is_near_chance():
    g = gen(3)
    train, test = torch.randn(2000, 32, generator=g), torch.randn(1000, 32, generator=g)
    train_y, test_y = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    acc = knn_accuracy(train, train_y, test, test_y, k=20, num_classes=10)
    assert 0.06 < acc < 0.14  # chance is 0.1; sd of the estimate ~0.01


def test_knn_chunking_and_weights():
    g = gen(4)
    train, test = torch.randn(300, 8, generator=g, dtype=torch.float64), torch.randn(97, 8, generator=g,
                                                                                    dtype=torch.float64)
    train_y = torch.randint(0, 6, (300,), generator=g)
    full = knn_predict(train, train_y, test, k=15, num_classes=6, chunk_size=10_000)
    for chunk in (1, 7, 96):
        assert torch.equal(knn_predict(train, train_y, test, k=15, num_classes=6, chunk_size=chunk), full)
    # Dense reference: exp(cos/T) weighted votes of the k nearest.
    sim = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    top, idx = sim.topk(15, dim=1)
    scores = torch.zeros(97, 6, dtype=torch.float64).scatter_add_(1, train_y[idx], (top / 0.07).exp())
    assert torch.equal(full, scores.argmax(1))
    # The weighting matters: one very close neighbour outvotes two far ones (k=3), unlike a majority vote.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    pred = knn_predict(train, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.05]]), k=3, temperature=0.07)
    assert pred.tolist() == [0]
    assert knn_predict(train, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.05]]), k=3,
                       temperature=100.0).tolist() == [1]


# ----------------------------------------------------------------------------------------------------------
# Embedding health
# ----------------------------------------------------------------------------------------------------------
N, D = 2000, 32


@pytest.fixture(scope="module")
def isotropic() -> torch.Tensor:
    return torch.randn(N, D, generator=gen(10))


@pytest.fixture(scope="module")
def collapsed() -> torch.Tensor:
    """Every row close to one direction: the anisotropic extreme."""
    direction = F.normalize(torch.randn(D, generator=gen(11)), dim=0)
    return 5 * direction + 0.005 * torch.randn(N, D, generator=gen(12))


def test_mean_pairwise_cosine(isotropic, collapsed):
    x = torch.randn(50, 6, generator=gen(5), dtype=torch.float64)
    u = F.normalize(x, dim=1)
    dense = ((u @ u.T).sum() - 50) / (50 * 49)  # hand formula with the diagonal removed
    assert float(mean_pairwise_cosine(x)) == pytest.approx(float(dense), abs=1e-12)
    assert abs(float(mean_pairwise_cosine(isotropic))) < 0.01
    assert float(mean_pairwise_cosine(collapsed)) > 0.99
    two = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert float(mean_pairwise_cosine(two)) == pytest.approx(-1.0)


def test_isotropy_partition(isotropic, collapsed):
    iso, ani = float(isotropy_partition(isotropic)), float(isotropy_partition(collapsed))
    assert iso > 0.9 and ani < 0.2 and iso > ani
    # Hand case (raw form): identical rows m give Z(+m^) = N e^|m|, Z(-m^) = N e^-|m|, others N: I = e^{-2|m|}.
    m = torch.tensor([0.3, 0.0, 0.4], dtype=torch.float64)  # |m| = 0.5
    same = m.repeat(10, 1)
    assert float(isotropy_partition(same, normalize=False)) == pytest.approx(math.exp(-1.0), rel=1e-9)
    assert float(isotropy_partition(same)) == pytest.approx(math.exp(-2.0), rel=1e-9)  # unit rows: the floor
    # +-e_k on every axis: perfectly isotropic.
    axes = torch.cat([torch.eye(4), -torch.eye(4)]).double()
    assert float(isotropy_partition(axes)) == pytest.approx(1.0, abs=1e-12)


def test_effective_rank(isotropic, collapsed):
    assert float(effective_rank(isotropic)) > 0.9 * D
    assert float(effective_rank(collapsed)) < 1.5
    # Hand case: singular values (3, 1) -> p = (3/4, 1/4), erank = exp(H(p)).
    x = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert float(effective_rank(x)) == pytest.approx(math.exp(h), rel=1e-9)
    assert float(effective_rank(torch.eye(5).double())) == pytest.approx(5.0, rel=1e-9)
    assert float(effective_rank(torch.ones(3, 4))) == pytest.approx(1.0, rel=1e-6)  # rank one
    assert float(effective_rank(torch.zeros(3, 4))) == 0.0
    wide = torch.randn(5, 40, generator=gen(6), dtype=torch.float64)  # N < D uses the N x N Gram matrix
    s = torch.linalg.svdvals(wide)
    p = s / s.sum()
    assert float(effective_rank(wide)) == pytest.approx(float((-(p * p.log()).sum()).exp()), rel=1e-9)


def test_alignment():
    x = torch.randn(20, 8, generator=gen(7))
    assert float(alignment(x, x.clone())) == pytest.approx(0.0, abs=1e-6)
    assert float(alignment(3 * x, x)) == pytest.approx(0.0, abs=1e-6)  # normalised: scale is irrelevant
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert float(alignment(a, b)) == pytest.approx(2.0)  # ||e1 - e2||^2
    assert float(alignment(a, -a, alpha=1)) == pytest.approx(2.0)


def dense_uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    u = F.normalize(x.double(), dim=1)
    n = u.shape[0]
    vals = [math.exp(-t * float((u[i] - u[j]).square().sum())) for i in range(n) for j in range(i + 1, n)]
    return math.log(sum(vals) / len(vals))


def test_uniformity(isotropic, collapsed):
    same = torch.tensor([0.2, -1.0, 0.5]).repeat(30, 1)
    assert float(uniformity(same)) == pytest.approx(0.0, abs=1e-5)  # the maximum
    spread = float(uniformity(isotropic, max_samples=500))
    assert spread < -3.0  # ~ -2t = -4 for many points on a 32-d sphere
    assert float(uniformity(collapsed, max_samples=500)) > -0.01 > spread
    x = torch.randn(23, 5, generator=gen(8), dtype=torch.float64)
    ref = dense_uniformity(x)
    for chunk in (1, 4, 22, 1000):
        assert float(uniformity(x, chunk_size=chunk)) == pytest.approx(ref, abs=1e-12)
    assert float(uniformity(x, t=0.5)) == pytest.approx(dense_uniformity(x, 0.5), abs=1e-12)
    # Subsampling is seeded: the same rows every call, different rows for another seed.
    a = float(uniformity(isotropic, max_samples=100, seed=1))
    assert a == float(uniformity(isotropic, max_samples=100, seed=1)) != float(uniformity(isotropic,
                                                                                        max_samples=100, seed=2))


def test_same_class_pairs():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # class 2 and 3 have a single row: never an anchor
    i, j = same_class_pairs(labels, max_pairs=100, seed=0)
    assert sorted(i.tolist()) == [0, 1, 2, 4, 5]
    assert (labels[i] == labels[j]).all() and (i != j).all()
    i2, j2 = same_class_pairs(labels, max_pairs=100, seed=0)
    assert torch.equal(i, i2) and torch.equal(j, j2)
    assert same_class_pairs(labels, max_pairs=2, seed=0)[0].numel() == 2
    assert same_class_pairs(torch.arange(5), max_pairs=10)[0].numel() == 0


def test_embedding_health(isotropic, collapsed):
    labels = torch.arange(N) % 10
    good = embedding_health(isotropic, labels, max_samples=500)
    bad = embedding_health(collapsed, labels, max_samples=500)
    keys = {"mean_norm", "mean_cosine", "isotropy", "effective_rank", "effective_rank_ratio", "uniformity",
            "alignment"}
    assert set(good) == set(bad) == keys and all(isinstance(v, float) for v in good.values())
    assert good["mean_cosine"] < 0.01 < 0.99 < bad["mean_cosine"]
    assert good["isotropy"] > bad["isotropy"]
    assert good["effective_rank"] > 0.9 * D > 1.5 > bad["effective_rank"]
    assert good["uniformity"] < bad["uniformity"]
    assert good["alignment"] > bad["alignment"]  # random same-class pairs are far apart; collapsed ones close
    assert "alignment" not in embedding_health(isotropic[:50])
    assert embedding_health(isotropic, labels, max_samples=500) == good  # reproducible


# ----------------------------------------------------------------------------------------------------------
# Precision-recall curves
# ----------------------------------------------------------------------------------------------------------
def test_pr_histograms_summed_over_batches_give_tensorboards_curves():
    """Counts from two batches, summed (as ranks and batches are), give exactly the one-vs-rest curve
    TensorBoard's add_pr_curve computes from all the raw scores; the pooled curve is the sum over classes."""
    from torch.utils.tensorboard.summary import compute_curve

    c, t = 5, 127
    labels = torch.randint(0, c, (300,), generator=gen(0))
    probs = (torch.randn(300, c, generator=gen(1)) + 2 * F.one_hot(labels, c)).softmax(-1)
    hist = pr_histograms(probs[:120], labels[:120], t) + pr_histograms(probs[120:], labels[120:], t)
    assert hist.shape == (2, c, t) and hist.dtype == torch.int64
    assert hist[0].sum() == 300 and hist[1].sum() == 300 * (c - 1)  # each row: one positive, c-1 negatives
    curves = pr_curves(hist)
    for k in range(c):
        ref = compute_curve((labels == k).numpy(), probs[:, k].numpy(), num_thresholds=t)
        for row, key in enumerate(("tp", "fp", "tn", "fn", "precision", "recall")):
            np.testing.assert_allclose(curves[key][k].numpy(), ref[row], rtol=1e-12, atol=1e-12, err_msg=key)
    pooled = pr_curves(hist.sum(dim=1, keepdim=True))
    ref = compute_curve(F.one_hot(labels, c).reshape(-1).numpy(), probs.reshape(-1).numpy(), num_thresholds=t)
    np.testing.assert_allclose(pooled["precision"][0].numpy(), ref[4], rtol=1e-12)
    with pytest.raises(ValueError):
        pr_histograms(probs, labels[:10])


def _empty_batch():
    return torch.zeros(0, 3, 2, 2), torch.zeros(0, dtype=torch.long), []


def _encode(images):
    return {"backbone": images.flatten(1)[:, :4] + 1.0, "projection": images.flatten(1)[:, 4:6]}


def _embed_with_an_empty_share(rank, world_size):
    gen = torch.Generator().manual_seed(rank)
    share = [(torch.randn(5, 3, 2, 2, generator=gen), torch.tensor([0, 1, 0, 1, 1]), list("abcde"))]
    bank = at_least_one(share, _empty_batch)
    queries = at_least_one(share if rank == 0 else [], _empty_batch)  # rank 1's share of the split is empty
    results, gathered = evaluate_embeddings(_encode, bank, queries, torch.device("cpu"), torch.float32, 2,
                                            (10, 5), "val", k=3)
    return results["samples"], results["bank_samples"], tuple(gathered["projection"].shape)


def test_a_rank_with_an_empty_share_still_joins_the_gathers():
    """A split smaller than ranks x workers leaves some ranks without a batch: they embed one empty batch
    (torch.cat of nothing raised on them while the others waited in the gather)."""
    embeddings, labels = embed_split(_encode, at_least_one([], _empty_batch), torch.device("cpu"), torch.float32)
    assert embeddings["backbone"].shape == (0, 4) and embeddings["projection"].shape == (0, 2) and len(labels) == 0
    with pytest.raises((RuntimeError, ValueError)):
        embed_split(_encode, [], torch.device("cpu"), torch.float32)  # what the evaluator did before
    from dist_helpers import run_in_processes

    assert run_in_processes(_embed_with_an_empty_share, 2) == [(5, 10, (5, 2))] * 2
