"""The demo's step commands (``dalle_dist.demo.pipeline.build_steps``), without running them."""

from __future__ import annotations

import pytest

from dalle_dist.config import build_config
from dalle_dist.demo import pipeline
from dalle_dist.demo.pipeline import CONFIGS, DemoSettings, build_steps


def _config(stage: str):  # noqa: ANN202 - a DVAERunConfig or PriorRunConfig
    """The demo YAML as the trainer reads it (data paths are the demo's to fill in)."""
    data = {"data.shards": "x.tar"} | ({"data.tokenizer": "t.json"} if stage == "prior" else {})
    return build_config(stage, [CONFIGS / f"{stage}.yaml"], data)


def _cmd(tmp_path, name: str = "prior", **kw) -> list[str]:
    steps = build_steps(DemoSettings(out=str(tmp_path / "demo"), **kw))
    return next(s.cmd for s in steps if s.name == name)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_steps_fall_back_to_fp32_without_native_bf16(tmp_path, monkeypatch, capsys, native) -> None:
    """configs/demo/{dvae,prior}.yaml compute in bf16; where bf16 would be emulated the demo passes fp32 instead."""
    assert _config("prior").precision.dtype == "bf16"
    assert _config("dvae").precision.dtype == "bf16"
    monkeypatch.setattr(pipeline, "native_bf16", lambda device: native)
    for name in ("dvae", "prior"):
        cmd = _cmd(tmp_path, name)
        if native:
            assert "--precision.dtype" not in cmd
        else:
            assert "--precision.dtype fp32" in " ".join(cmd)
    out = capsys.readouterr().out
    assert ("no native bf16" in out) is not native


def test_demo_defaults_agree_with_the_prior_config(tmp_path) -> None:
    """`dalle-dist demo` passes --train.steps / --optim.lr_steps; the YAML's own values describe the same run."""
    cfg = _config("prior")
    s = DemoSettings(out=str(tmp_path))
    assert cfg.train.steps == s.prior_steps == cfg.optim.lr_steps
    cmd = _cmd(tmp_path)
    assert cmd[cmd.index("--train.steps") + 1] == str(s.prior_steps)
    assert cmd[cmd.index("--optim.lr_steps") + 1] == str(s.prior_steps)


def test_prior_step_launches_the_package_module_with_shipped_configs(tmp_path) -> None:
    """torchrun runs ``-m dalle_dist.launch`` (no path into a checkout), with the demo YAML that ships."""
    assert (CONFIGS / "prior.yaml").is_file() and (CONFIGS / "dvae.yaml").is_file()
    cmd = _cmd(tmp_path)
    i = cmd.index("torch.distributed.run")
    assert cmd[i - 1] == "-m" and "--nproc-per-node" in cmd
    assert cmd[cmd.index("dalle_dist.launch") - 1] == "-m"
    assert not any(c.endswith("run.py") for c in cmd)
    assert cmd[cmd.index("--config") + 1] == str(CONFIGS / "prior.yaml")
