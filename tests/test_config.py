"""Configs: every shipped YAML loads; every documented error names the field path and the fix."""

import pytest

from dynamoe.config import (
    ConfigError,
    DataConfig,
    MoEConfig,
    RouterConfig,
    RunConfig,
    apply_override,
    from_dict,
    load_config,
    shipped_configs,
    to_dict,
)


def test_every_shipped_config_loads_and_validates():
    shipped = shipped_configs()
    assert {"quickstart", "debug_tiny", "sst2_moe_classifier"} <= set(shipped)
    for name in shipped:
        cfg = load_config(name)
        assert isinstance(cfg, RunConfig)
        assert cfg.train.name == name
        # Round trip: the resolved form builds the same config again.
        assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_overrides_parse_yaml_values_and_reach_nested_fields():
    cfg = load_config("quickstart", ["model.moe.num_experts=16", "train.lr=3e-4", "model.moe.router.normalize=false"])
    assert cfg.model.moe.num_experts == 16
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.moe.router.normalize is False


@pytest.mark.parametrize(
    "data, path, fix",
    [
        ({"model": {"moe": {"num_expert": 8}}}, "model.moe.num_expert", "did you mean 'num_experts'"),
        ({"trian": {}}, "trian", "did you mean 'train'"),
        ({"model": {"moe": {"num_experts": 4, "router": {"top_k": 5}}}}, "model.moe.router.top_k", "top_k <= 4"),
        ({"parallel": {"ep_size": 3}}, "parallel.ep_size", "[1, 2, 4, 8]"),
        ({"model": {"d_model": 0}}, "model.d_model", "> 0"),
        ({"model": {"moe": {"d_expert": -4}}}, "model.moe.d_expert", "> 0"),
        ({"train": {"batch_size": 0}}, "train.batch_size", "> 0"),
        ({"data": {"path": "/definitely/not/here.txt"}}, "data.path", "existing file"),
        ({"model": {"moe": {"router": {"score": "softmx"}}}}, "model.moe.router.score", "did you mean 'softmax'"),
        ({"model": {"n_heads": 3}}, "model.n_heads", "divid"),
        ({"train": {"lr": "fast"}}, "train.lr", "number"),
        ({"model": {"moe_every": 9}}, "model.moe_every", "dense"),
        ({"data": {"dataset": "sst2"}}, "model.kind", "encoder"),
        ({"data": {"seq_len": 4096}}, "data.seq_len", "max_seq_len"),
        ({"parallel": {"zero_stage": 3}}, "parallel.zero_stage", "stage 0, 1 or 2"),
    ],
)
def test_errors_name_the_field_and_the_fix(data, path, fix):
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, data)
    message = str(err.value)
    assert message.startswith(path + ":"), message
    assert "fix:" in message and fix in message, message


def test_component_configs_validate_on_direct_construction():
    with pytest.raises(ConfigError, match="model.moe.router.top_k"):
        MoEConfig(num_experts=2, router=RouterConfig(top_k=3))
    with pytest.raises(ConfigError, match="model.moe.router.jitter_eps"):
        RouterConfig(jitter_eps=-0.1)
    with pytest.raises(ConfigError, match="data.val_fraction"):
        DataConfig(val_fraction=1.5)
    with pytest.raises(TypeError):
        RouterConfig(2)  # keyword-only


def test_normalize_defaults_to_top_k_above_one():
    assert RouterConfig(top_k=1).renormalize is False
    assert RouterConfig(top_k=2).renormalize is True
    assert RouterConfig(top_k=1, normalize=True).renormalize is True


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "train.lr")
    with pytest.raises(ConfigError, match="not a section"):
        apply_override({"train": {"lr": 1.0}}, "train.lr.x=1")


def test_unknown_config_name_suggests_a_shipped_one():
    with pytest.raises(ConfigError, match="did you mean 'quickstart'"):
        load_config("quikstart")


def test_bad_yaml_is_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
