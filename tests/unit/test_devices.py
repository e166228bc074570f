"""``dalle_dist.devices.resolve_device``: the one resolver behind every --device / train.device flag."""

from __future__ import annotations

import pytest
import torch

from dalle_dist.cli import main
from dalle_dist.config import ConfigError
from dalle_dist.data.pretokenize import _device_for
from dalle_dist.devices import DeviceError, resolve_device
from dalle_dist.eval.cli import EvalError, _device


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as one without a GPU, whatever it really has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_auto_and_cpu() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" cpu ") == torch.device("cpu")


def test_auto_without_cuda_is_cpu(no_cuda: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert _device_for("auto", 3) == "cpu"


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_refused_with_the_fix(no_cuda: None, name: str) -> None:
    with pytest.raises(DeviceError, match=rf"--train.device {name}: no CUDA device is visible; use --train.device cpu"):
        resolve_device(name, "--train.device")
    with pytest.raises(EvalError, match="no CUDA device"):
        _device(name)
    with pytest.raises(DeviceError):
        _device_for(name, 0)


def test_unknown_device_names_the_choices() -> None:
    with pytest.raises(DeviceError, match="'gpu' is not a device: use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    assert issubclass(DeviceError, ConfigError)  # the CLI prints it as a config error, without a traceback


def test_generate_refuses_cuda_before_loading_anything(no_cuda: None, tmp_path, capsys) -> None:
    rc = main(
        [
            "generate",
            "--checkpoint",
            str(tmp_path / "absent"),
            "--text",
            "a red circle",
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    assert "--device cuda: no CUDA device is visible; use --device cpu" in capsys.readouterr().err
