"""Typed configuration: one dataclass per concern, named flavors, YAML overlays, dotted CLI overrides.

A run config is built in three layers, each overriding the previous one:

1. the dataclass defaults (which run the tiny CPU model) or a named model flavor (``model.flavor``);
2. YAML files in ``configs/`` (nested mappings with the same keys as the dataclasses);
3. dotted command-line overrides such as ``--optim.lr 3e-4``.

Unknown keys are refused with the closest valid name, before anything is built. The dataclasses and flavors are
in :mod:`dalle_dist.config_schema` and importable from here; this module turns files and command lines into them.

The shipped YAMLs (``configs/`` at the root of the checkout) are also package data of the wheel: a path such as
``configs/prior/tiny.yaml`` that does not exist relative to the working directory is read from the copy that
came with the package (:func:`resolve_config_path`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .config_schema import (
    ATTN_LAYOUTS,
    DVAE_FLAVORS,
    DVAE_LIKELIHOODS,
    FLAVORS,
    PRIOR_FLAVORS,
    RUN_CONFIGS,
    CommConfig,
    ConfigError,
    DataConfig,
    DVAEModelConfig,
    DVAEOptimConfig,
    DVAERunConfig,
    ParallelConfig,
    PrecisionConfig,
    PriorModelConfig,
    PriorOptimConfig,
    PriorRunConfig,
    TrainConfig,
    _suggest,
    model_config,
)

__all__ = [
    "ATTN_LAYOUTS",
    "DVAE_FLAVORS",
    "DVAE_LIKELIHOODS",
    "FLAVORS",
    "PRIOR_FLAVORS",
    "RUN_CONFIGS",
    "CommConfig",
    "ConfigError",
    "DataConfig",
    "DVAEModelConfig",
    "DVAEOptimConfig",
    "DVAERunConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "PriorModelConfig",
    "PriorOptimConfig",
    "PriorRunConfig",
    "TrainConfig",
    "add_config_arguments",
    "build_config",
    "config_from_args",
    "from_dict",
    "load_yaml",
    "model_config",
    "parse_overrides",
    "resolve_config_path",
    "shipped_configs",
    "to_dict",
]


# --------------------------------------------------------------------------------------------------
# Shipped YAML files: the checkout's configs/, or the wheel's copy of it
# --------------------------------------------------------------------------------------------------


def shipped_configs() -> Path:
    """The directory of the shipped YAMLs (``dvae/``, ``prior/``, ``demo/``).

    Installed from a wheel it is the package data ``dalle_dist/configs`` (setup.py maps the checkout's
    ``configs/`` there); imported from a checkout (editable install or ``PYTHONPATH``) it is ``configs/`` at the
    root of the checkout.
    """
    packaged = resources.files("dalle_dist") / "configs"
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[1] / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself when it exists; else, for a relative ``configs/...`` path, the shipped copy of that file.

    So ``--config configs/prior/tiny.yaml`` works from any directory once the package is installed, while a file
    of the same name in the working directory still wins. Raises ``ConfigError`` naming ``path`` when neither is
    there.
    """
    p = Path(path)
    if p.is_file():
        return p
    parts = p.parts
    if not p.is_absolute() and len(parts) > 1 and parts[0] == "configs":
        shipped = shipped_configs().joinpath(*parts[1:])
        if shipped.is_file():
            return shipped
        raise ConfigError(f"config file {str(p)!r} not found (nor in the shipped configs, {shipped_configs()})")
    raise ConfigError(f"config file {str(p)!r} not found")


# --------------------------------------------------------------------------------------------------
# Building configs from flavors, YAML and dotted overrides
# --------------------------------------------------------------------------------------------------


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _coerce(value: Any, tp: Any, dotted: str) -> Any:
    """Turn a YAML value or a CLI string into the field's declared type."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{dotted} expects {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(v, a, dotted) for v, a in zip(value, args))
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            result = float(value)
            if not math.isfinite(result):
                raise ValueError(value)
            return result
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{dotted}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None
    return value


def _set_dotted(cfg: Any, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = cfg
    for depth, part in enumerate(parts):
        if not is_dataclass(node):
            raise ConfigError(f"{'.'.join(parts[:depth])} is a value, not a section; cannot set {dotted}")
        hints = typing.get_type_hints(type(node))
        names = [f.name for f in fields(node)]
        if part not in names:
            here = ".".join(parts[:depth])
            valid = [f"{here}.{n}" if here else n for n in names]
            guess = ".".join(parts[: depth + 1])
            raise ConfigError(f"unknown config key {dotted!r}{_suggest(guess, valid)}; valid keys here: {valid}")
        if depth == len(parts) - 1:
            if is_dataclass(getattr(node, part)):
                raise ConfigError(f"{dotted} is a section; set one of its keys, e.g. {dotted}.<key>")
            setattr(node, part, _coerce(value, hints[part], dotted))
        else:
            node = getattr(node, part)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = resolve_config_path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections (model:, optim:, ...)")
    return data


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """``["--optim.lr", "3e-4", "--train.steps=5"]`` → ``{"optim.lr": "3e-4", "train.steps": "5"}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"cannot read argument {arg!r}: overrides look like --section.key VALUE")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg} has no value")
            i += 1
            value = argv[i]
        out[key] = value
        i += 1
    return out


def build_config(
    stage: str,
    yaml_paths: typing.Sequence[str | Path] = (),
    overrides: dict[str, Any] | None = None,
) -> DVAERunConfig | PriorRunConfig:
    """Defaults → ``model.flavor`` preset → YAML overlays → dotted overrides; then validate."""
    if stage not in RUN_CONFIGS:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {list(RUN_CONFIGS)}")
    layers = [_flatten(load_yaml(p)) for p in yaml_paths] + [dict(overrides or {})]
    flat: dict[str, Any] = {}
    for layer in layers:
        flat.update(layer)
    cfg = RUN_CONFIGS[stage]()
    flavor = flat.pop("model.flavor", None)
    if flavor is not None:
        cfg.model = model_config(stage, str(flavor))
    for dotted, value in flat.items():
        _set_dotted(cfg, dotted, value)
    cfg.validate()
    return cfg


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--config YAML`` (repeatable) and ``--flavor``: with dotted overrides, what :func:`config_from_args` reads."""
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="YAML",
        help="YAML overlay (repeatable; later files win), e.g. configs/prior/tiny.yaml (a configs/... path not "
        "found here is read from the copy shipped with the package)",
    )
    p.add_argument("--flavor", help="shorthand for --model.flavor")


def config_from_args(stage: str, args: argparse.Namespace, extra: list[str]) -> DVAERunConfig | PriorRunConfig:
    """The run config a command line asks for: ``args.config`` files, ``args.flavor`` and the dotted overrides
    left over in ``extra`` (``dalle-dist train-*`` / ``config`` and the torchrun launcher all read it here)."""
    overrides = parse_overrides(extra)
    if args.flavor:
        overrides["model.flavor"] = args.flavor
    return build_config(stage, args.config, overrides)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON output and checkpoints."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def from_dict(stage: str, tree: dict[str, Any]) -> DVAERunConfig | PriorRunConfig:
    """Rebuild a run config saved with :func:`to_dict` (checkpoints, exports)."""
    cfg = RUN_CONFIGS[stage]()
    for dotted, value in _flatten(tree).items():
        _set_dotted(cfg, dotted, value)
    cfg.validate()
    return cfg
