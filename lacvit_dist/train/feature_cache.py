"""Contrast-enlarging gradient accumulation: one contrastive loss over all k micro-batches of an optimizer step.

open_clip's accum-freq scheme (and GradCache): a no-grad forward caches every micro-batch's projections; then
each micro-batch j is recomputed with gradient and the loss over the WHOLE accumulated batch is taken with
only block j differentiable. The k backward passes together give exactly the gradient of the one-big-batch
loss, provided the recompute is the same function as the cached forward. Stochastic depth and dropout draw
random masks, so the random state each micro-batch's cached forward started from is captured and replayed
for its recompute (as torch.utils.checkpoint does): the masks are then identical, and the cached block equals
the recomputed one exactly. Capturing the state reads the generators' seed and offset on the host; it queues
no kernel and waits for none.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch


@dataclass(frozen=True)
class RngState:
    """The CPU generator's state and, for an accelerator, that device's generator state."""
    cpu: torch.Tensor
    device: torch.device
    accelerator: torch.Tensor | None


def capture_rng(device: torch.device) -> RngState:
    """The random state a forward on `device` will draw from (CPU generator, plus the device's own).

    Only the model's device is captured: reading every visible GPU's generator would create a CUDA context on
    each of them from every rank, and the forward draws from none of them."""
    device = torch.device(device)
    accelerator = None
    if device.type != "cpu":
        module = torch.get_device_module(device.type)
        accelerator = module.get_rng_state(device.index if device.index is not None else module.current_device())
    return RngState(torch.get_rng_state(), device, accelerator)


@contextlib.contextmanager
def replayed_rng(state: RngState) -> Iterator[None]:
    """Run the body from `state`; the generators are restored on exit, so the stream outside is unchanged."""
    accelerated = state.accelerator is not None
    module = torch.get_device_module(state.device.type) if accelerated else None
    index = (state.device.index if state.device.index is not None else module.current_device()) if accelerated else None
    with torch.random.fork_rng(devices=[index] if accelerated else [], device_type=state.device.type):
        torch.set_rng_state(state.cpu)
        if accelerated:
            module.set_rng_state(state.accelerator, index)
        yield


Batch = tuple[torch.Tensor, torch.Tensor]


def feature_cache_step(engine, micro_batches: list[Batch], place: Callable[[Batch], Batch],
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]],
                       backward_step: Callable[[torch.Tensor], None]) -> dict[str, torch.Tensor]:
    """One optimizer step over all micro-batches with the contrast set enlarged to their union.

    `micro_batches` may live on the host: `place` moves one micro-batch to the model's device when it is
    used, so at most one micro-batch of images is resident on the device. `backward_step(loss)` back-propagates
    one micro-batch's loss WITHOUT dividing by the number of micro-batches (each carries a disjoint part of the
    gradient of the one global loss) and steps the engine. Returns the loss function's detached statistics."""
    states, cached, labels = [], [], []
    with torch.no_grad():
        for batch in micro_batches:
            images, batch_labels = place(batch)
            states.append(capture_rng(images.device))
            cached.append(engine(images).detach())
            labels.append(batch_labels)
    all_labels = torch.cat(labels)
    stats: dict[str, torch.Tensor] = {}
    for j, batch in enumerate(micro_batches):
        images, _ = place(batch)
        with replayed_rng(states[j]):
            fresh = engine(images)
        loss, stats = loss_fn(torch.cat(cached[:j] + [fresh] + cached[j + 1:]), all_labels)
        backward_step(loss)
    return {key: value.detach().float() for key, value in stats.items()}
