"""Label-aware (supervised) contrastive loss over the global batch: local anchor rows x gathered columns.

The loss is the "L_out" supervised contrastive loss of Khosla et al. 2020 ("Supervised Contrastive
Learning"), the stage-1 objective of LaCViT. For every view ``i`` of the GLOBAL batch (every view is an
anchor), with ``z`` the L2-normalised projections and ``t`` the temperature::

    l_i = -(t / t_b) * 1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a in A(i)} exp(z_i.z_a / t) )

``A(i)``: every other view of the global batch (``i`` itself excluded), on any rank.
``P(i)``: the views of ``A(i)`` with the label of ``i`` (the other view(s) of the same image included).
``t_b`` (``base_temperature``) is the authors' extra scaling; ``None`` means ``t_b = t`` (no scaling).

The global loss is the mean of ``l_i`` over the VALID anchors (``|P(i)| > 0``). An anchor without a positive
(possible with one view per image) contributes neither a NaN nor a term, and is counted in the stats.

Distributed form and gradient contract
--------------------------------------
Each rank holds ``n`` local views (``B x V``, the same on every rank) and gathers every rank's projections
WITH gradient (:func:`lacvit_dist.distributed.all_gather_with_grad`, rank order) and the labels without. It
computes only its own ``n`` anchor rows against the ``N = world x n`` gathered columns: memory
``O(n x N)``, never the ``N x N`` matrix. The self column of local row ``j`` is ``rank * n + j``.

Rank ``r`` returns ``L_r = world * S_r / N_valid``, where ``S_r`` is the sum of its valid anchors' ``l_i``
and ``N_valid`` the GLOBAL number of valid anchors (all-reduced, no gradient). Why: the gather's backward
sums, into the owner's slice, the gradients that every rank's loss sends to it, so after each rank
backpropagates its own ``L_r`` the gradient that reaches rank ``r``'s inputs is
``d(sum_r' L_r') / dx_r = world * dL/dx_r`` with ``L = sum_r S_r / N_valid`` the single-process loss on the
concatenated batch. The data-parallel engine (DeepSpeed, DDP) then AVERAGES parameter gradients over ranks:
``(1/world) * sum_r world * dL/dtheta|_{via x_r} = dL/dtheta``, exactly the gradient of the single-process
loss. Consequences: the VALUE returned on one rank is not the global loss (the mean of the returned values
over ranks is); for logging use ``stats["loss"]``, the global loss, which costs no extra collective. Do not
divide the returned loss by the world size yourself, and do not all-reduce it before ``backward``.

Numerics: the projections are cast to fp32 (fp64 stays fp64) BEFORE the gather (so the gradient exchange is fp32 too; for a
128-d head this is tiny), and the logits and log-sum-exp run in fp32 with autocast disabled, whatever the
input dtype (bf16/fp16 logits overflow or lose the softmax). The row max (self excluded, detached) is
subtracted before the log-sum-exp. No atomics or scatter-adds: the result is deterministic.

Stats (detached tensors; no ``.item()``, so no host sync in the hot path): ``loss`` (global loss value),
``anchors_without_positive`` (global count), ``positives_per_anchor`` (global mean over all anchors),
``contrast_size`` (terms in each denominator = global views - 1).

Difference from the authors' code (HobbitLong/SupContrast, used by LaCViT): there, an anchor without a
positive gets a zero loss that still counts in the mean, and the batch is the per-GPU micro-batch.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lacvit_dist import distributed as D

__all__ = ["SupConLoss", "supcon_loss", "supcon_rows", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 inputs (the tests' exact comparisons)."""
    return torch.promote_types(dtype, torch.float32)


def supcon_rows(anchors: Tensor, contrast: Tensor, anchor_labels: Tensor, contrast_labels: Tensor,
                offset: int, temperature: float) -> tuple[Tensor, Tensor]:
    """The single-process core: per-anchor mean log-probability of the positives, and positive counts.

    ``anchors`` [n, d] are rows ``offset .. offset + n - 1`` of ``contrast`` [N, d] (so the self column of
    anchor ``j`` is ``offset + j``); labels are [n] and [N]. Returns ``(mean_log_prob_pos [n], n_pos [n])``
    where ``mean_log_prob_pos`` is 0 (not NaN) for anchors with ``n_pos == 0``. Computed in fp32 whatever
    the input dtype (fp64 stays fp64), autocast off. Memory: one fp32 and one bool ``n x N`` matrix kept for
    backward; the peak, in autograd's backward, is about 20 bytes per ``n x N`` element (measured by
    tools/bench_loss.py). Needs ``N >= 2``.
    """
    n, N = anchors.shape[0], contrast.shape[0]
    if N < 2:
        raise ValueError(f"supervised contrastive loss needs at least 2 views in the global batch, got {N}")
    if not 0 <= offset <= N - n:
        raise ValueError(f"anchor offset {offset} with {n} anchors does not fit in {N} contrast rows")
    dev = anchors.device
    cdtype = compute_dtype(anchors.dtype)
    with torch.autocast(device_type=dev.type, enabled=False):
        # 1/t is applied to the n x d anchors rather than to the n x N logits.
        logits = (anchors.to(cdtype) * (1.0 / temperature)) @ contrast.to(cdtype).T  # [n, N]
        rows = torch.arange(n, device=dev)
        self_cols = rows + offset
        # In place (no n x N copies): the matmul's backward needs its inputs, not its output, and neither the
        # self fill nor the subtraction of a detached max needs the values in backward.
        logits[rows, self_cols] = float("-inf")  # self is excluded from A(i) (and from P(i), below)
        logits.sub_(logits.amax(dim=1, keepdim=True).detach())  # stability; cancels in the log-prob
        log_denominator = torch.logsumexp(logits, dim=1)  # over A(i); exp(-inf) = 0 for self

        positives = anchor_labels.view(n, 1) == contrast_labels.view(1, N)  # [n, N] bool
        positives[rows, self_cols] = False
        n_pos = positives.sum(dim=1)
        # sum_{p in P(i)} log_prob_ip = sum_p logit_ip - |P(i)| * log_denominator_i
        # (`where`, not a product, so that the -inf self entry never meets a 0; its backward keeps the bool mask)
        pos_logit_sum = torch.where(positives, logits, 0.0).sum(dim=1)
        valid = n_pos > 0
        n_pos_f = n_pos.to(logits.dtype)
        mean_log_prob_pos = (pos_logit_sum - n_pos_f * log_denominator) / n_pos_f.clamp(min=1.0)
        mean_log_prob_pos = torch.where(valid, mean_log_prob_pos, 0.0)
    return mean_log_prob_pos, n_pos


def _check_same_local_shape(features: Tensor) -> None:
    """Every rank must hold the same [batch, views, dim]: gathered columns and self offsets depend on it.

    One tiny all-gather and a host read; run it once (see ``SupConLoss(check_shapes=...)``), not every step.
    """
    if D.world_size() == 1:
        return
    shape = torch.tensor(list(features.shape), dtype=torch.int64, device=features.device)
    shapes = D.all_gather_no_grad(shape.view(1, 3)).cpu().tolist()
    if any(s != shapes[0] for s in shapes):
        per_rank = ", ".join(f"rank {r}: {tuple(s)}" for r, s in enumerate(shapes))
        raise ValueError("SupConLoss needs the same local [batch, views, dim] on every rank (drop the last "
                         f"partial batch, same per-rank batch size); got {per_rank}")


def supcon_loss(features: Tensor, labels: Tensor, temperature: float = 0.1, base_temperature: float | None = None,
                *, check_shapes: bool = True, normalize: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """Supervised contrastive loss of this rank's anchors against the global batch (see the module doc).

    Args:
        features: LOCAL L2-normalised projections ``[batch, views, dim]`` (``[batch, dim]`` means one view),
            any float dtype, the same shape on every rank.
        labels: LOCAL integer labels ``[batch]``.
        temperature: ``t``.
        base_temperature: the authors' ``t_b`` (0.07 in SupContrast): the loss is multiplied by ``t / t_b``.
            ``None``: no extra scaling.
        check_shapes: check that every rank has the same local shape (one tiny collective + host sync).
        normalize: L2-normalise ``features`` in fp32 first (for callers that pass raw projections).

    Returns:
        ``(loss, stats)``: ``loss`` is this rank's share ``world * S_r / N_valid`` (0-dim, fp32; fp64 for fp64
            input), to
        be backpropagated on every rank under a data-parallel engine that averages gradients; ``stats`` holds
        detached tensors: ``loss`` (the global loss), ``anchors_without_positive``, ``positives_per_anchor``,
        ``contrast_size``.
    """
    if features.dim() == 2:
        features = features.unsqueeze(1)
    if features.dim() != 3:
        raise ValueError(f"features must be [batch, views, dim] (or [batch, dim]), got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point, got {features.dtype}")
    batch, views, dim = features.shape
    labels = labels.reshape(-1)
    if labels.numel() != batch:
        raise ValueError(f"labels has {labels.numel()} entries for a batch of {batch}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    if temperature <= 0 or (base_temperature is not None and base_temperature <= 0):
        raise ValueError(f"temperatures must be > 0, got {temperature} / {base_temperature}")

    world, rank = D.world_size(), D.rank()
    if check_shapes:
        _check_same_local_shape(features)
    dev = features.device
    n = batch * views
    scale = 1.0 if base_temperature is None else temperature / base_temperature
    cdtype = compute_dtype(features.dtype)

    with torch.autocast(device_type=dev.type, enabled=False):
        # Batch-major order: row b * views + v; the same on every rank, so rank r owns rows r*n .. r*n+n-1.
        z = features.to(cdtype).reshape(n, dim)
        if normalize:
            z = F.normalize(z, dim=1)
        z_all = D.all_gather_with_grad(z)
        y = labels.to(device=dev, dtype=torch.int64).repeat_interleave(views)
        y_all = D.all_gather_no_grad(y)
    N = z_all.shape[0]

    if N < 2:  # a single view in the whole job: no contrast term at all
        zero = z.sum() * 0.0
        return zero, {
            "loss": zero.detach().clone(),
            "anchors_without_positive": torch.tensor(float(N), device=dev, dtype=cdtype),
            "positives_per_anchor": torch.zeros((), device=dev, dtype=cdtype),
            "contrast_size": torch.tensor(float(N - 1), device=dev, dtype=cdtype),
        }

    mean_log_prob_pos, n_pos = supcon_rows(z, z_all, y, y_all, offset=rank * n, temperature=temperature)
    anchor_loss = -scale * mean_log_prob_pos  # 0 for anchors without positive
    local_sum = anchor_loss.sum()
    valid = (n_pos > 0).to(cdtype)
    # One all-reduce (no grad) for the global count, the positives and the logged loss.
    totals = D.all_reduce_sum(torch.stack([valid.sum(), n_pos.to(cdtype).sum(), local_sum.detach()]))
    n_valid, n_pos_total, loss_sum = totals[0], totals[1], totals[2]
    denominator = n_valid.clamp(min=1.0)
    loss = local_sum * (world / denominator)
    stats = {
        "loss": loss_sum / denominator,
        "anchors_without_positive": float(N) - n_valid,
        "positives_per_anchor": n_pos_total / float(N),
        "contrast_size": torch.tensor(float(N - 1), device=dev, dtype=cdtype),
    }
    return loss, stats


class SupConLoss(torch.nn.Module):
    """Supervised contrastive ("L_out") loss over the global batch; see the module docstring for the maths,
    the distributed form and the gradient contract (``loss`` = this rank's share, for engines that average
    gradients over ranks; ``stats["loss"]`` = the global value, for logging).

    ``check_shapes``: when to verify that all ranks hold the same local shape (it costs a tiny all-gather
    and a host sync): ``"first"`` call only (default), ``"always"`` or ``"never"``. Every rank calls the loss
    the same number of times, so the check runs on the same calls everywhere.
    """

    def __init__(self, temperature: float = 0.1, base_temperature: float | None = None, *,
                 check_shapes: Literal["first", "always", "never"] = "first", normalize: bool = False):
        super().__init__()
        if temperature <= 0 or (base_temperature is not None and base_temperature <= 0):
            raise ValueError(f"temperatures must be > 0, got {temperature} / {base_temperature}")
        if check_shapes not in ("first", "always", "never"):
            raise ValueError(f"check_shapes must be 'first', 'always' or 'never', got {check_shapes!r}")
        self.temperature = float(temperature)
        self.base_temperature = None if base_temperature is None else float(base_temperature)
        self.check_shapes = check_shapes
        self.normalize = normalize
        self._calls = 0

    def forward(self, features: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        check = self.check_shapes == "always" or (self.check_shapes == "first" and self._calls == 0)
        self._calls += 1
        return supcon_loss(features, labels, self.temperature, self.base_temperature, check_shapes=check,
                           normalize=self.normalize)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, base_temperature={self.base_temperature}"
