"""The feature cache's recompute is the same function as its cached forward: stochastic depth and dropout
draw the same masks when the random state is replayed (lacvit_dist.train.feature_cache)."""
import torch

from lacvit_dist.config import load_config
from lacvit_dist.train.feature_cache import capture_rng, replayed_rng
from lacvit_dist.models.factory import build_contrastive_model

STOCHASTIC = ["model.name=vit_tiny_patch16_224", "model.overrides.img_size=16", "model.overrides.patch_size=4",
              "model.overrides.embed_dim=32", "model.overrides.depth=2", "model.overrides.num_heads=2",
              "model.proj_dim=16", "model.drop_path_rate=0.3", "model.overrides.proj_drop_rate=0.2",
              "model.overrides.attn_drop_rate=0.2"]


def _model():
    torch.manual_seed(0)
    model = build_contrastive_model(load_config(None, STOCHASTIC).model)
    return model.train()


def test_replayed_recompute_equals_cached_forward_exactly():
    model, views = _model(), torch.randn(6, 2, 3, 16, 16)
    state = capture_rng(torch.device("cpu"))
    with torch.no_grad():
        cached = model(views)
    after_cached = torch.get_rng_state()
    with replayed_rng(state):
        recomputed = model(views)
    assert recomputed.requires_grad
    assert torch.equal(recomputed.detach(), cached)
    # The replay leaves the stream where the cached forward left it: the next micro-batch draws fresh masks.
    assert torch.equal(torch.get_rng_state(), after_cached)


def test_without_replay_the_masks_differ():
    """What the replay prevents: a second forward draws other drop-path / dropout masks."""
    model, views = _model(), torch.randn(6, 2, 3, 16, 16)
    with torch.no_grad():
        first, second = model(views), model(views)
    assert (first - second).norm() / first.norm() > 0.05
