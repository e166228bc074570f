"""Per-resblock gradient scaling [P §2.4, Fig. 4, App. D.1, D.3]: one fp16 gradient scale per resblock.

Backward pass through resblock k (forward runs left to right; gradients flow right to left)::

    h ──fp32──┬──────────────────────────────────────────────────(+)──► h + f(h)        residual stream, fp32
              │                                                   ▲
              ▼                                                   │
       _UnscaleOutgoingGrad ─► branch f (fp16/bf16) ─► _ScaleIncomingGrad
       bwd: g32 = g / s_k          param grads = s_k · ∂L/∂θ       bwd: g16 = (g32 · s_k) → branch dtype
            Inf/NaN → 0 (filter)
            (counted)

The gradient entering the branch is multiplied by s_k; the gradient leaving it is divided by s_k in fp32 and
filtered before it joins the sum of gradients from later resblocks [P Fig. 4]. So resblock k's parameter
gradients come out × s_k. They are never unscaled in 16 bits (that is the underflow this scheme avoids): the
engine stores every parameter shard in fp32 (``apply_stage_precision``), so its gradients are fp32 too, and
``unscale_`` divides them by s_k in place, in fp32, before the replica reduction and the clip [P E.2(2)].
One process and many run this same protocol; the scaler holds every resblock key of the model, so flags and
scales agree on every rank whichever resblocks it holds.

The scale a backward pass uses is the one recorded by that step's forward hook; ``unscale_`` divides by that same
recorded value, so ``update`` (which changes the scales) may run at any point after the backward pass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..config import PrecisionConfig

REST = "rest"  # flag key of the parameters outside every resblock (embeddings, head): fp32 and never scaled


class _ScaleIncomingGrad(torch.autograd.Function):
    """Identity at a branch's output; the forward casts the branch's result to fp32 for the residual stream.

    Backward: the fp32 gradient from later resblocks × scale, cast to the branch's dtype [P Fig. 4]. Casting after
    the multiplication is what keeps small gradients out of fp16's subnormal range.
    """

    @staticmethod
    def forward(ctx: Any, y: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        ctx.dtype = y.dtype
        return y.float() if y.dtype != torch.float32 else y.view_as(y)  # (B, T, d) fp32

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return (grad.float() * ctx.scale).to(ctx.dtype), None  # (B, T, d) branch dtype, × s_k


class _UnscaleOutgoingGrad(torch.autograd.Function):
    """Identity at a branch's input. Backward: gradient in fp32 ÷ scale, Inf/NaN set to 0 (the paper's "filter").

    Without the filter one overflow in resblock k would poison every earlier resblock's gradients and drop all
    their scales, which then underflow [P Fig. 4]. The zeroed values are counted into ``counter`` (no host sync).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float, counter: Tensor) -> Tensor:
        ctx.scale = scale
        ctx.dtype = x.dtype
        ctx.counter = counter
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        g = grad.float() / ctx.scale  # (B, T, d) fp32, unscaled
        bad = ~torch.isfinite(g)
        ctx.counter.add_(bad.sum())
        return g.masked_fill_(bad, 0.0).to(ctx.dtype), None, None


def branch_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's resblock branches by key: ``model.resblocks``, whose modules return f(x) without the residual."""
    blocks = getattr(model, "resblocks", None)
    if not isinstance(blocks, nn.ModuleDict):
        raise TypeError(
            f"{type(model).__name__} has no `resblocks` ModuleDict; per-resblock gradient scaling needs branch-only "
            "resblocks (the model adds the residual), as DallePrior has"
        )
    return dict(blocks.items())


def grads_by_block(named: Iterable[tuple[str, nn.Parameter]]) -> dict[str, list[Tensor]]:
    """Local gradient tensors grouped by resblock key (``resblocks.K.*`` → K) and ``REST`` (embeddings, head).

    ``named`` yields (single-process name, parameter); DTensor gradients give their local shard.
    """
    groups: dict[str, list[Tensor]] = {}
    for name, p in named:
        if p.grad is None:
            continue
        key = name.split(".")[1] if name.startswith("resblocks.") else REST
        g = p.grad
        groups.setdefault(key, []).append(g.to_local() if hasattr(g, "to_local") else g)
    return groups


class ResblockGradScaler:
    """One dynamic gradient scale per resblock with the update rule of [P App. D.1]; a stateful numerics policy.

    Per step: ``attach`` (once) → forward → backward → ``unscale_`` (in place, fp32) → ``sync_finite_flags`` →
    ``update``; if it returns True the engine reduces, clips and applies the update. ``replicas`` is M, the number of
    data-parallel replicas: every scale carries the factor M because the loss is divided by the global batch
    [P D.3]. Scales are Python floats (float64), so the growth factor 2^(1/1000) does not round away.
    """

    def __init__(self, keys: list[str], cfg: PrecisionConfig, replicas: int = 1) -> None:
        cfg.validate()
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        if not keys or len(set(keys)) != len(keys):
            raise ValueError(f"keys must be a non-empty list of distinct resblock keys, got {keys}")
        self.keys = list(keys)
        self.cfg = cfg
        self.replicas = replicas
        init = replicas * 2.0**cfg.init_scale_log2  # M·2^13 [P D.1]
        self.scales: dict[str, float] = dict.fromkeys(self.keys, init)
        self.last_backoff: dict[str, int | None] = dict.fromkeys(self.keys)  # update index of the last division
        self.block_skips: dict[str, int] = dict.fromkeys(self.keys, 0)  # updates with nonfinite parameter grads
        self.updates = 0  # calls of update(), applied or skipped
        self.skips = 0  # skipped updates
        # Per-step values (not state): scale used by the forward in flight, filter counters, last measurements.
        self._used: dict[str, float] = {}
        self._filtered: dict[str, Tensor] = {}
        self._last_filtered: dict[str, int] = dict.fromkeys(self.keys, 0)
        self._grad_norms: dict[str, float] = dict.fromkeys([*self.keys, REST], 0.0)

    @property
    def min_scale(self) -> float:
        return self.replicas * 2.0**self.cfg.min_scale_log2  # M·2^7 [P D.1]

    @property
    def max_scale(self) -> float:
        return self.replicas * 2.0**self.cfg.max_scale_log2  # M·2^24 [P D.1]

    # ---- backward-pass hooks -------------------------------------------------------------------------

    def attach(self, blocks: nn.Module | Mapping[str, nn.Module]) -> list[RemovableHandle]:
        """Wrap resblock branches with the scale / unscale-and-filter pair [P Fig. 4]; returns the hook handles.

        ``blocks``: a whole model (every key must be there), or the resblocks this rank holds by key (a pipeline
        stage's subset; resblocks held elsewhere count as finite in this rank's flags, their owners report them).
        """
        if isinstance(blocks, nn.Module):
            blocks = branch_modules(blocks)
            missing = [k for k in self.keys if k not in blocks]
            if missing:
                raise KeyError(f"resblocks {missing} are not in the model (it has {list(blocks)})")
        unknown = [k for k in blocks if k not in self.scales]
        if unknown:
            raise KeyError(f"resblocks {unknown} are not among the scaler's keys")
        handles = []
        for key, block in blocks.items():
            handles.append(block.register_forward_pre_hook(functools.partial(self._enter, key), with_kwargs=True))
            handles.append(block.register_forward_hook(functools.partial(self._leave, key)))
        return handles

    def _enter(self, key: str, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not torch.is_grad_enabled():
            return None  # inference and sampling run the plain branch
        x = args[0]  # (B, T, d) residual stream, fp32
        scale = self.scales[key]
        self._used[key] = scale  # this step's backward and unscale_ both use exactly this value
        counter = self._filtered.get(key)
        if counter is None or counter.device != x.device:
            counter = self._filtered[key] = torch.zeros((), dtype=torch.int64, device=x.device)
        return (_UnscaleOutgoingGrad.apply(x, scale, counter), *args[1:]), kwargs

    def _leave(self, key: str, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if not torch.is_grad_enabled():
            return None
        return _ScaleIncomingGrad.apply(output, self._used[key])  # (B, T, d) fp32

    # ---- after backward ------------------------------------------------------------------------------

    @torch.no_grad()
    def unscale_(self, grads: Mapping[str, list[Tensor]]) -> tuple[dict[str, bool], dict[str, int]]:
        """Divide each local fp32 gradient of resblock k by the s_k its forward used, in place; flag nonfinite ones.

        ``grads`` maps resblock keys (and ``REST``) to this rank's local gradient tensors (:func:`grads_by_block`),
        which must be fp32: unscaled in fp32 they cannot underflow [P E.2(2)]. Returns (a flag for every key and
        ``REST``, this rank's filter counts per key since the last call).
        """
        flags = dict.fromkeys([*self.keys, REST], True)
        checks: list[tuple[str, Tensor]] = []
        for key, tensors in grads.items():
            if not tensors:
                continue
            if key != REST:
                if key not in self._used:
                    raise RuntimeError(
                        f"resblock {key} has gradients but no scaled forward was recorded: attach the scaler before "
                        "the forward pass, and call unscale_ once per backward"
                    )
                inv = 1.0 / self._used[key]
                for g in tensors:
                    if g.dtype != torch.float32:
                        raise TypeError(
                            f"resblock {key}: gradient is {g.dtype}; unscaling needs the fp32 storage of "
                            "apply_stage_precision"
                        )
                    g.mul_(inv)
            checks.append((key, torch.stack([torch.isfinite(g).all() for g in tensors]).all()))
        if checks:
            for (key, _), ok in zip(checks, torch.stack([c for _, c in checks]).tolist()):  # one host sync
                flags[key] = bool(ok)
        counts = dict.fromkeys(self.keys, 0)
        if self._filtered:
            values = torch.stack([c.cpu() for c in self._filtered.values()]).tolist()
            counts.update(zip(self._filtered, map(int, values)))
            for c in self._filtered.values():
                c.zero_()
        self._used.clear()
        return flags, counts

    def record(self, filtered: Mapping[str, int], grad_norms: Mapping[str, float]) -> None:
        """This step's global measurements for :meth:`telemetry` (summed filter counts, unscaled norms)."""
        self._last_filtered = dict.fromkeys(self.keys, 0) | dict(filtered)
        self._grad_norms = dict.fromkeys([*self.keys, REST], 0.0) | dict(grad_norms)

    def update(self, finite: Mapping[str, bool]) -> bool:
        """Apply the scale rule of [P App. D.1] for one update; returns whether the optimizer step may run.

        Per resblock: finite parameter gradients → × 2^(growth_log2); nonfinite → ÷ backoff, unless this scale was
        already divided within the last ``backoff_window`` updates, in which case it is held. Then clamp to
        [M·2^min, M·2^max]. The step is skipped if any flag (any resblock, or ``REST``) is False — also when the
        division was blocked by the window: a nonfinite gradient is never applied [P E.2(2)].
        """
        missing = [k for k in self.keys if k not in finite]
        if missing:
            raise KeyError(f"finite flags are missing resblocks {missing}")
        self.updates += 1
        t = self.updates
        cfg = self.cfg
        for key in self.keys:
            scale = self.scales[key]
            if finite[key]:
                scale *= 2.0**cfg.growth_log2
            else:
                self.block_skips[key] += 1
                last = self.last_backoff[key]
                if last is None or t - last >= cfg.backoff_window:
                    scale /= cfg.backoff
                    self.last_backoff[key] = t
            self.scales[key] = min(max(scale, self.min_scale), self.max_scale)
        apply = all(bool(v) for v in finite.values())
        self.skips += int(not apply)
        return apply

    # ---- logging and checkpoints ---------------------------------------------------------------------

    def telemetry(self) -> dict[str, float]:
        """Flat metrics for JSONL: per resblock ``gradscale/K/{log2,skips,filtered,grad_norm}`` and totals.

        ``log2``: log2 of the current scale; ``skips``: updates so far with nonfinite parameter gradients in this
        resblock; ``filtered``: activation-gradient values the filter zeroed at its boundary in the last backward;
        ``grad_norm``: L2 norm of its unscaled parameter gradients in the last backward.
        """
        out: dict[str, float] = {}
        for key in self.keys:
            out[f"gradscale/{key}/log2"] = math.log2(self.scales[key])
            out[f"gradscale/{key}/skips"] = float(self.block_skips[key])
            out[f"gradscale/{key}/filtered"] = float(self._last_filtered[key])
            out[f"gradscale/{key}/grad_norm"] = self._grad_norms[key]
        out[f"gradscale/{REST}/grad_norm"] = self._grad_norms[REST]
        out["gradscale/skips"] = float(self.skips)
        out["gradscale/updates"] = float(self.updates)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "keys": list(self.keys),
            "replicas": self.replicas,
            "scales": [self.scales[k] for k in self.keys],
            "last_backoff": [-1 if self.last_backoff[k] is None else self.last_backoff[k] for k in self.keys],
            "block_skips": [self.block_skips[k] for k in self.keys],
            "updates": self.updates,
            "skips": self.skips,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a saved state. On a different replica count M the scales are rescaled by M_new / M_old [P D.3]."""
        keys = list(state["keys"])
        if set(keys) != set(self.keys):
            raise ValueError(
                f"grad-scaler state is for resblocks {keys[:4]}… ({len(keys)}) but this model has "
                f"{self.keys[:4]}… ({len(self.keys)}): differing {sorted(set(keys) ^ set(self.keys))[:5]}"
            )
        ratio = self.replicas / int(state["replicas"])
        for i, k in enumerate(keys):
            self.scales[k] = min(max(float(state["scales"][i]) * ratio, self.min_scale), self.max_scale)
            last = int(state["last_backoff"][i])
            self.last_backoff[k] = None if last < 0 else last
            self.block_skips[k] = int(state["block_skips"][i])
        self.updates = int(state["updates"])
        self.skips = int(state["skips"])


def sync_finite_flags(flags: Mapping[str, bool], group: dist.ProcessGroup | None = None) -> dict[str, bool]:
    """AND of every rank's flags (``all_reduce`` MIN), so all ranks skip together and their scales stay equal.

    The paper synchronises the per-shard nonfinite flags before the update [P E.2(10)]. Every rank must pass the
    same keys in the same order. Without an initialised process group (or with one rank) this returns the flags.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return dict(flags)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    t = torch.tensor([1.0 if v else 0.0 for v in flags.values()], device=device)  # (n_flags,)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return {k: bool(v) for k, v in zip(flags, t.tolist())}
