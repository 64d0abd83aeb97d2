"""`model.pretrained: true` loads timm's weights for a real tag from a Hugging Face cache, offline, through timm
(position embeddings resampled to img_size, classifier dropped, strict); a missing tag stops with an error that
names the tag, the cache folder and the fetch command; the fetch command reports cached / missing offline."""
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from conftest import REPO
from lacvit_dist.config import ConfigError, ModelConfig, load_config
from lacvit_dist.models.factory import build_classifier, create_backbone
from lacvit_dist.models.pretrained import FETCH_COMMAND, WeightsMissingError, resolve

TAG = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # a real timm tag (5.7M parameters)


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face home, offline. huggingface_hub reads the variables once, at import: set both."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return home


def cache_weights(home: Path, tag: str, state: dict[str, torch.Tensor]) -> Path:
    """The layout the hub client leaves: hub/models--timm--<tag>/snapshots/<rev>/model.safetensors + refs/main."""
    repo = home / "hub" / f"models--timm--{tag}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    path = repo / "snapshots" / rev / "model.safetensors"
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def source_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=1000).state_dict()


def test_config_loads_exactly_the_cached_weights_resampled(hf_home):
    src = source_state()
    cache_weights(hf_home, TAG, src)
    cfg = ModelConfig(name=TAG, pretrained=True, overrides={"img_size": 64})
    model = create_backbone(cfg, num_classes=7)
    state = model.state_dict()
    assert model.patch_embed.img_size == (64, 64)
    for key, value in src.items():
        if key == "pos_embed":  # 14x14 -> 4x4 grid, by timm's own resampling (CLS token kept)
            assert torch.equal(state[key], resample_abs_pos_embed(value, new_size=[4, 4], num_prefix_tokens=1))
        elif not key.startswith("head."):
            assert torch.equal(state[key], value), key
    assert state["head.weight"].shape == (7, 192)  # the 1000-class classifier was dropped, a fresh head
    # The tag's own preprocessing (augreg: mean 0.5) comes with it.
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)


def test_missing_weights_stop_with_tag_cache_and_command(hf_home):
    cfg = ModelConfig(name=TAG, pretrained=True)
    with pytest.raises(WeightsMissingError) as err:
        create_backbone(cfg)
    message = str(err.value)
    assert TAG in message and str(hf_home / "hub") in message and FETCH_COMMAND in message
    assert "HF_HUB_OFFLINE" in message


def test_weights_that_do_not_fit_are_refused(hf_home):
    src = source_state()
    del src["blocks.3.mlp.fc1.weight"]
    cache_weights(hf_home, TAG, src)
    with pytest.raises(ValueError, match=r"blocks\.3\.mlp\.fc1\.weight"):
        create_backbone(ModelConfig(name=TAG, pretrained=True, overrides={"img_size": 64}))


def test_stage2_from_a_backbone_reads_no_pretrained_weights(hf_home, tmp_path):
    """Stage 2 replaces the backbone with stage 1's: the (absent) hub weights are not needed."""
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64)
    path = tmp_path / "backbone.safetensors"
    save_file(backbone.state_dict(), str(path))
    model = build_classifier(ModelConfig(name=TAG, pretrained=True, overrides={"img_size": 64}), 3, str(path))
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], backbone.state_dict()["blocks.0.attn.qkv.weight"])


def test_unknown_tag_and_pretrained_with_path_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"model.name: timm has no pretrained weights .*vit_tiny_patch16_224.mae"):
        resolve("vit_tiny_patch16_224.mae")
    with pytest.raises(ConfigError, match="model.pretrained: true and model.pretrained_path"):
        load_config(REPO / "configs" / "demo_digits.yaml",
                    ["model.pretrained=true", f"model.pretrained_path={tmp_path / 'w.safetensors'}"])


def test_fetch_command_offline(hf_home, capsys):
    from lacvit_dist.models.pretrained import main as fetch

    assert fetch([TAG]) == 1  # missing and offline: a clear error, nothing downloaded
    err = capsys.readouterr().err
    assert TAG in err and "HF_HUB_OFFLINE" in err and str(hf_home / "hub") in err
    path = cache_weights(hf_home, TAG, source_state())
    assert fetch([TAG]) == 0
    assert f"{TAG}: cached at {path}" in capsys.readouterr().out


def test_fetch_command_reads_the_tag_from_a_config(hf_home, tmp_path, capsys):
    from lacvit_dist.models.pretrained import main as fetch

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model:\n  name: {TAG}\n  pretrained: true\n")
    cache_weights(hf_home, TAG, source_state())
    assert fetch(["--config", str(cfg)]) == 0
    assert TAG in capsys.readouterr().out
    cfg.write_text(f"model:\n  name: {TAG}\n")  # pretrained: false -> nothing to fetch, said plainly
    assert fetch(["--config", str(cfg)]) == 2
    assert "model.pretrained" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["vit_b16", "vit_l16", "vit_h14"])
def test_presets_name_pretrained_hub_tags(preset):
    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    assert cfg.model.pretrained and cfg.model.pretrained_path is None
    weights = resolve(cfg.model.name)
    assert weights.repo_id == f"timm/{weights.tag}" and "in21k" in weights.tag
