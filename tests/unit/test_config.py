"""Config: flavors, YAML overlays, dotted overrides, refusals with the closest valid name."""

import argparse
from pathlib import Path

import pytest

from dalle_dist.config import (
    PRIOR_FLAVORS,
    ConfigError,
    add_config_arguments,
    build_config,
    config_from_args,
    from_dict,
    model_config,
    parse_overrides,
    resolve_config_path,
    shipped_configs,
    to_dict,
)


def test_defaults_are_tiny_and_valid():
    cfg = build_config("prior")
    assert cfg.model.flavor == "tiny" and cfg.model.d_model == 64
    assert build_config("dvae").model.grid == 8


@pytest.mark.parametrize(
    "flavor,d,heads",
    [("12B", 3968, 62), ("5.6B", 2688, 42), ("2.8B", 1920, 30), ("1.3B", 1280, 20)],
)
def test_paper_flavors(flavor, d, heads):
    m = model_config("prior", flavor)
    assert (m.n_layers, m.d_model, m.n_heads, m.head_dim) == (64, d, heads, 64)
    assert (m.text_len, m.text_vocab, m.grid, m.image_vocab) == (256, 16384, 32, 8192)
    assert m.seq_len == 1280


def test_all_flavors_validate():
    for name in PRIOR_FLAVORS:
        model_config("prior", name).validate()
    assert model_config("dvae", "openai").grid == 32


def test_yaml_overlay_then_overrides(tmp_path: Path):
    y = tmp_path / "a.yaml"
    y.write_text("model:\n  flavor: small\noptim:\n  lr: 1.0e-3\n  betas: [0.8, 0.9]\ntrain:\n  steps: 7\n")
    cfg = build_config("prior", [y], parse_overrides(["--optim.lr", "3e-4", "--train.steps=9"]))
    assert cfg.model.flavor == "small" and cfg.model.d_model == 768
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.train.steps == 9


def test_flavor_then_model_override_wins():
    cfg = build_config("prior", overrides={"model.n_layers": "2", "model.flavor": "small"})
    assert cfg.model.d_model == 768 and cfg.model.n_layers == 2


@pytest.mark.parametrize(
    "key,suggestion",
    [("optim.lrr", "optim.lr"), ("modle.d_model", "model"), ("train.step", "train.steps")],
)
def test_unknown_key_names_closest(key, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'"):
        build_config("prior", overrides={key: "1"})


def test_unknown_flavor_suggests():
    with pytest.raises(ConfigError, match="did you mean '12B'"):
        build_config("prior", overrides={"model.flavor": "12b"})


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"optim.lr": "fast"}, "cannot read 'fast' as float"),
        ({"train.steps": "1.5"}, "as int"),
        ({"model.d_model": "65"}, "not divisible by model.n_heads"),
        ({"model.conv_kernel": "4"}, "odd"),
        ({"data.source": "folder"}, "--data.path"),
        ({"optim.betas": "0.9"}, "expects 2"),
        ({"model": "1"}, "is a section"),
        ({"train.resume": "maybe"}, "as bool"),
    ],
)
def test_bad_values_refused_with_advice(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_config("prior", overrides=overrides)


def test_bad_dvae_image_size():
    with pytest.raises(ConfigError, match="not divisible"):
        build_config("dvae", overrides={"model.image_size": "60"})


def test_yaml_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        build_config("prior", [tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config("prior", [bad])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="--section.key"):
        parse_overrides(["lr", "3"])
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--optim.lr"])


def test_round_trip_through_dict():
    cfg = build_config("prior", overrides={"model.flavor": "small", "optim.betas": "0.9,0.95"})
    again = from_dict("prior", to_dict(cfg))
    assert again == cfg


def test_shipped_yaml_configs_load():
    root = Path(__file__).resolve().parents[2] / "configs"
    for stage in ("dvae", "prior"):
        files = sorted((root / stage).glob("*.yaml"))
        assert files
        for f in files:
            build_config(stage, [f])


def test_configs_paths_fall_back_to_the_shipped_copy(tmp_path: Path, monkeypatch):
    """From a checkout the shipped copy is configs/ at its root; installed, the wheel's package data."""
    root = Path(__file__).resolve().parents[2] / "configs"
    assert shipped_configs() == root
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert resolve_config_path("configs/prior/tiny.yaml") == root / "prior" / "tiny.yaml"
    assert build_config("prior", ["configs/prior/tiny.yaml"]) == build_config("prior", [root / "prior" / "tiny.yaml"])
    with pytest.raises(ConfigError, match="'configs/prior/nope.yaml' not found"):
        build_config("prior", ["configs/prior/nope.yaml"])
    with pytest.raises(ConfigError, match="'prior/tiny.yaml' not found"):
        build_config("prior", ["prior/tiny.yaml"])  # only configs/... paths fall back
    local = tmp_path / "configs" / "prior" / "tiny.yaml"  # a file in the working directory wins
    local.parent.mkdir(parents=True)
    local.write_text("train:\n  steps: 3\n")
    assert build_config("prior", ["configs/prior/tiny.yaml"]).train.steps == 3


def test_config_from_args_is_the_command_line_reading():
    """`dalle-dist train-*` / `config` and the torchrun launcher read --config, --flavor and overrides here."""
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    args, extra = p.parse_known_args(["--config", "configs/prior/tiny.yaml", "--flavor", "small", "--train.steps=4"])
    cfg = config_from_args("prior", args, extra)
    assert cfg.model.flavor == "small" and cfg.train.steps == 4
    with pytest.raises(ConfigError, match="--section.key"):
        config_from_args("prior", args, ["stray"])
