"""One resolver for every ``--device`` / ``train.device`` value the commands accept.

``auto`` picks CUDA when a device is visible and the CPU otherwise; ``cuda`` or ``cuda:N`` without a visible
CUDA device is refused up front with the flag's name and the fix, instead of failing later inside a kernel
launch or a checkpoint load.
"""

from __future__ import annotations

import torch

from .config import ConfigError


class DeviceError(ConfigError):
    """A device the user asked for that this machine cannot give; the message names the flag and the fix."""


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """``"auto" | "cpu" | "cuda" | "cuda:N" | ...`` → a :class:`torch.device` this process can use.

    ``flag`` is how the user spelled the option (``--device``, ``--train.device``), for the error message.
    """
    name = name.strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"{flag} {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{flag} {name}: no CUDA device is visible; use {flag} cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s) are visible (indices from 0)"
            )
    return device
