"""Config merge (defaults <- YAML <- dotted overrides) and the errors that name the offending field."""
import pytest
import yaml

from lacvit_dist.config import (ConfigError, check_batch_arithmetic, load_config, parse_dotlist, save_config)


def write(tmp_path, data) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_merge_order_defaults_file_overrides(tmp_path):
    path = write(tmp_path, {"stage1": {"epochs": 3, "optimizer": {"lr": 0.5}}, "model": {"name": "vit_small_patch16_224"}})
    cfg = load_config(path, ["stage1.epochs=5", "model.overrides.depth=2", "deepspeed.precision=bf16"])
    assert cfg.stage1.epochs == 5                     # CLI beats file
    assert cfg.stage1.optimizer.lr == 0.5             # file beats default
    assert cfg.stage1.optimizer.momentum == 0.9       # default kept beside a partial section
    assert cfg.model.name == "vit_small_patch16_224"
    assert cfg.model.overrides == {"depth": 2}
    assert cfg.deepspeed.precision == "bf16"


def test_stage_specific_defaults_survive_partial_override(tmp_path):
    # stage2's own defaults (lr 0.1, no weight decay) must not fall back to the generic optimizer defaults.
    cfg = load_config(write(tmp_path, {"stage2": {"optimizer": {"momentum": 0.5}}}))
    assert cfg.stage2.optimizer.lr == 0.1 and cfg.stage2.optimizer.weight_decay == 0.0
    assert cfg.stage2.optimizer.momentum == 0.5


def test_int_accepted_for_float_and_yaml_values_in_overrides():
    cfg = load_config(None, ["stage1.optimizer.lr=1", "run.stages=[stage1, baseline]", "stage2.backbone_path=null"])
    assert cfg.stage1.optimizer.lr == 1.0 and isinstance(cfg.stage1.optimizer.lr, float)
    assert cfg.run.stages == ["stage1", "baseline"]
    assert cfg.stage2.backbone_path is None


def test_exponent_floats_without_a_dot_are_floats_in_files_and_overrides(tmp_path):
    """YAML 1.1 (PyYAML's default) reads 1e-3 as a string; the config reads YAML 1.2 floats."""
    path = tmp_path / "c.yaml"
    path.write_text("stage1:\n  optimizer: {lr: 1e-3, betas: [0.9, 9.99E-1]}\nmodel:\n  overrides: {drop_rate: 5e-2}\n")
    cfg = load_config(path, ["stage2.optimizer.lr=2.5e-2", "run.name=1e3x"])
    assert cfg.stage1.optimizer.lr == 0.001 and cfg.stage1.optimizer.betas == [0.9, 0.999]
    assert cfg.model.overrides["drop_rate"] == 0.05 and cfg.stage2.optimizer.lr == 0.025
    assert cfg.run.name == "1e3x"  # not a number: still a string


@pytest.mark.parametrize("overrides, field", [
    (["stage1.epoch=3"], "stage1.epoch: unknown key"),
    (["modle.name=x"], "modle: unknown key"),
    (["stage1.epochs=three"], "stage1.epochs: expected int"),
    (["stage1.epochs=true"], "stage1.epochs: expected int, got boolean"),
    (["deepspeed.precision=fp8"], "deepspeed.precision: 'fp8' is not one of"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage: 4 is not one of"),
    (["stage1.micro_batch_size=0"], "stage1.micro_batch_size: must be >= 1"),
    (["stage2.optimizer.lr=-1"], "stage2.optimizer.lr: must be > 0"),
    (["run.stages=[stage3]"], "run.stages: unknown stage 'stage3'"),
    (["stage1.temperature=0"], "stage1.temperature: must be > 0"),
    (["stage1.optimizer.betas=[0.9]"], "stage1.optimizer.betas"),
    (["run.device=cpu", "deepspeed.precision=fp16"], "deepspeed.precision: fp16 is not supported"),
    (["run.device=cuda", "deepspeed.precision=fp16", "deepspeed.zero_stage=0"], "fp16 needs deepspeed.zero_stage >= 1"),
    (["stage1"], "expected dotted.key=value"),
])
def test_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, overrides)
    assert field in str(err.value)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"from .*cfg.yaml"):
        load_config(write(tmp_path, {"stage1": {"nope": 1}}))


def test_batch_arithmetic():
    cfg = load_config(None, ["stage1.micro_batch_size=8", "stage1.grad_accum_steps=2", "stage1.global_batch_size=32"])
    assert check_batch_arithmetic("stage1", cfg.stage1, 2, 100) == 100 // 32
    with pytest.raises(ConfigError, match=r"stage1.global_batch_size: 32 != .* = 48"):
        check_batch_arithmetic("stage1", cfg.stage1, 3, 100)
    with pytest.raises(ConfigError, match="stage1.micro_batch_size: global batch 32 .* exceeds the 20 training"):
        check_batch_arithmetic("stage1", cfg.stage1, 2, 20)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["stage1.epochs=7", "model.overrides.depth=2"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_dotlist_nesting():
    assert parse_dotlist(["a.b.c=1", "a.b.d=x", "e=[1, 2]"]) == {"a": {"b": {"c": 1, "d": "x"}}, "e": [1, 2]}


@pytest.mark.parametrize("override, field, bad", [
    ("stage1.optimizer.warmup_steps=-1", "stage1.optimizer.warmup_steps: must be >= 0", "-1"),
    ("model.drop_path_rate=1.5", "model.drop_path_rate: must be in [0, 1)", "1.5"),
    ("model.drop_path_rate=1", "model.drop_path_rate: must be in [0, 1)", "1.0"),
    ("model.drop_path_rate=-0.1", "model.drop_path_rate: must be in [0, 1)", "-0.1"),
    ("stage2.optimizer.momentum=-0.5", "stage2.optimizer.momentum: must be >= 0", "-0.5"),
    ("baseline.optimizer.betas=[0.9, 1.0]", "baseline.optimizer.betas[1]: must be in [0, 1)", "1.0"),
    ("stage1.optimizer.betas=[-0.1, 0.999]", "stage1.optimizer.betas[0]: must be in [0, 1)", "-0.1"),
    ("stage2.optimizer.weight_decay=-0.0001", "stage2.optimizer.weight_decay: must be >= 0", "-0.0001"),
    ("baseline.optimizer.warmup_steps=-3", "baseline.optimizer.warmup_steps: must be >= 0", "-3"),
    ("deepspeed.gradient_clipping=-1", "deepspeed.gradient_clipping: must be >= 0", "-1.0"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer: must be >= 0", "-1"),
    ("data.color_jitter=-0.4", "data.color_jitter: must be >= 0", "-0.4"),
    ("data.color_jitter=.nan", "data.color_jitter: must be >= 0", "nan"),  # NaN fails every comparison
])
def test_out_of_range_values_name_the_field_and_value(override, field, bad):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert field in str(err.value) and str(err.value).endswith(f"got {bad}")


def test_range_boundaries_are_accepted():
    cfg = load_config(None, ["model.drop_path_rate=0", "stage2.optimizer.momentum=0", "stage1.optimizer.betas=[0, 0]",
                             "stage1.optimizer.weight_decay=0", "deepspeed.gradient_clipping=0",
                             "data.shuffle_buffer=0", "data.color_jitter=0", "stage1.optimizer.warmup_steps=0"])
    assert cfg.model.drop_path_rate == 0.0 and cfg.deepspeed.gradient_clipping == 0.0


@pytest.mark.parametrize("overrides, fields", [
    (["data.train_split=test"], "data.train_split and data.test_split"),
    (["data.val_split=test"], "data.val_split and data.test_split"),
    (["data.train_split=val"], "data.train_split and data.val_split"),
])
def test_splits_must_differ(overrides, fields):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert message.startswith(fields) and "'" in message
    if "test_split" in fields:
        assert "test data must never be used for training or model monitoring" in message


def test_distinct_splits_and_no_val_split_are_accepted():
    assert load_config(None, ["data.val_split=null"]).data.val_split is None
    cfg = load_config(None, ["data.train_split=a", "data.val_split=b", "data.test_split=c"])
    assert (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split) == ("a", "b", "c")
