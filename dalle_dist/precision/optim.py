"""AdamW with fp32 moments (or bf16 moments for 16-bit parameters), whatever the parameter's storage dtype.

The paper stores the Adam moments of its 16-bit parameters in custom 16-bit formats (mean 1-6-9, variance 0-6-10,
exponent bias 60) and clips the variance estimate at 5 [P B.2; spec §3]. ``torch.optim.AdamW`` on an fp16
parameter keeps fp16 moments, where ε = 1e-8 rounds to 0 and the squared gradients under- and overflow fp16's
5-bit exponent. By default we keep both moments in fp32 (documented deviation: 8 bytes per parameter of optimizer
state instead of 4; see docs/precision.md); ``moments_dtype=torch.bfloat16`` stores the moments of 16-bit
parameters in bf16 — the paper's 4 bytes per parameter, with a wide exponent like its formats.
Optionally an fp32 master copy of each 16-bit parameter
(``master_weights``); without it the update is computed in fp32 and rounded into the 16-bit weight each step.

For fp32 parameters the arithmetic is exactly ``torch.optim.AdamW``'s single-tensor implementation. The prior's
engine stores every shard in fp32 and names its logically 16-bit ones (:class:`ShardedAdamW32`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn


class AdamW32(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose state is fp32: ``exp_avg``, ``exp_avg_sq`` and optionally ``master``."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        master_weights: bool = False,
        moments_dtype: torch.dtype = torch.float32,
    ) -> None:
        if moments_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"AdamW32 moments_dtype must be float32 or bfloat16, got {moments_dtype}")
        self.moments_dtype = moments_dtype
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW32 settings lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, master_weights=master_weights)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # groups saved by torch.optim.AdamW lack our option
            group.setdefault("master_weights", False)

    def _moment_dtype(self, p: Tensor) -> torch.dtype:
        """fp32 for fp32 parameters [P D.2]; ``moments_dtype`` for 16-bit ones (bf16 stands in for the paper's
        range-first 1-6-9 / 0-6-10 formats: 8 exponent bits keep squared gradients from underflowing)."""
        return torch.float32 if p.dtype == torch.float32 else self.moments_dtype

    def _init_state(self, p: Tensor, master: bool) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            dtype = self._moment_dtype(p)
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            if master and p.dtype != torch.float32:
                state["master"] = p.detach().float().clone(memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW update from the (already unscaled and clipped) gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW32 does not support sparse gradients")
                grad = p.grad.float()  # (same shape) fp32; a new tensor unless the gradient is already fp32
                state = self._init_state(p, group["master_weights"])
                # The fp32 tensor the update is applied to: the parameter itself, its master copy, or a temporary.
                w = state.get("master", p if p.dtype == torch.float32 else None)
                w = p.float() if w is None else w
                state["step"] += 1
                step = float(state["step"])
                w.mul_(1 - lr * wd)
                # 16-bit moments are updated in fp32 and rounded back; fp32 ones in place (torch's exact arithmetic).
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m32, v32 = (m, v) if m.dtype == torch.float32 else (m.float(), v.float())
                m32.lerp_(grad, 1 - beta1)
                v32.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if m32 is not m:
                    m.copy_(m32)
                    v.copy_(v32)
                step_size = lr / (1 - beta1**step)
                denom = (v32.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
                w.addcdiv_(m32, denom, value=-step_size)
                if w is not p:
                    p.copy_(w)  # round the fp32 result into the 16-bit storage
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``, but the moments and master copies stay fp32 (torch casts state to the
        parameter's dtype, which would round them to 16 bits and break an exact resume)."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if key != "step" and isinstance(value, Tensor) and value.is_floating_point():
                    dtype = self._moment_dtype(p) if key in ("exp_avg", "exp_avg_sq") else torch.float32
                    self.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)


class ShardedAdamW32(AdamW32):
    """``AdamW32`` over the engine's fp32 storage: a parameter's moments follow its *logical* precision.

    ``AdamW32`` picks ``moments_dtype`` for parameters stored in 16 bits; the engine stores every shard in fp32
    (``apply_stage_precision``), so the 16-bit ones are named by ``low`` instead (bf16 moments with
    ``precision.moments_dtype=bf16``, the paper's 4 bytes per parameter [P B.2]). The update is applied to the fp32
    storage in place and the engine rounds it to the 16-bit grid afterwards (``round_to_storage_``).
    """

    def __init__(self, params: Iterable, low: Iterable[Tensor], **kwargs: Any) -> None:
        self._low = {id(p) for p in low}
        super().__init__(params, **kwargs)

    def _moment_dtype(self, p: Tensor) -> torch.dtype:
        return self.moments_dtype if id(p) in self._low else torch.float32


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and conv kernels only; none on gains, biases and embeddings.

    The paper does not say which parameters decay (spec §5, UNVERIFIED); excluding gains, biases and
    embeddings is the common transformer practice. Embedding parameters live under ``embed.``.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not name.startswith("embed.") else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
