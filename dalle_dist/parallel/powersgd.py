"""Gradient reduction across data-parallel replicas: PowerSGD as in [P §2.5, App. E.2], or a plain all-reduce.

Both reductions return a :class:`ReduceResult` (averaged gradients, global norm, clip factor, a synchronised
``finite`` flag, bytes sent), so the engine picks one with ``comm.replica_reduce = allreduce | powersgd``
(:func:`build_replica_reducer`). Step numbers refer to the paper's E.2 list; docs/powersgd.md has the derivations.

Scaling (every replica i holds its own error buffer E_i; W replicas):

- P = Σ_i E_i·Q (all-reduce sum), P̂ = orth(P); Q' = Σ_i E_iᵀ·P̂ (all-reduce sum), then Q = Q'/W.
- The applied update is P̂·Qᵀ = P̂P̂ᵀ·mean_i(E_i); at full rank P̂P̂ᵀ = I, so it is exactly the mean gradient.
- E_i −= P̂·Qᵀ, which is the paper's E −= P·Q'ᵀ/num_machines [P E.2(12)] with the 1/W folded into Q's scale
  [P E.2(11)]. Then mean_i(E_i) = mean gradient − applied update: nothing is lost, only delayed.
- P, Q' and the update depend on the E_i only through Σ_i E_i, which is why a checkpoint stores only that sum
  [P E.2 notes].

The plain all-reduce and the shared helpers are in :mod:`.allreduce`, the compression plan, the fixed Q and the
byte accounting in :mod:`.powersgd_plan`; this module re-exports both, so import from here.

No ``from __future__ import annotations`` here: DDP checks the comm hook's annotations at registration.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dalle_dist.config import CommConfig
from dalle_dist.parallel.allreduce import (
    AllReduceReducer,
    ProcessGroup,
    ReduceResult,
    _all_reduce_sum,
    _clip_coef,
    _split,
    finite_rows,
    group_size,
    plain_allreduce,
)
from dalle_dist.parallel.householder import householder_orthogonalize
from dalle_dist.parallel.powersgd_plan import (
    UNCOMPRESSED_PREFIXES,
    MatrixPlan,
    compression_plan,
    fixed_q,
    powersgd_bytes,
    resblock_shapes,
    resolve_rank,
)

__all__ = [
    "UNCOMPRESSED_PREFIXES",
    "AllReduceReducer",
    "MatrixPlan",
    "PowerSGDHookState",
    "PowerSGDReducer",
    "ProcessGroup",
    "ReduceResult",
    "build_replica_reducer",
    "compression_plan",
    "finite_rows",
    "fixed_q",
    "group_size",
    "plain_allreduce",
    "powersgd_bytes",
    "powersgd_comm_hook",
    "resblock_shapes",
    "resolve_rank",
]


# --------------------------------------------------------------------------------------------------
# The reducer
# --------------------------------------------------------------------------------------------------


_EMPTY = torch.empty(0)


@dataclass
class _Batch:
    """Same-shape compressed matrices, batched: one bmm and one QR per batch [P E.2(3-7)]."""

    m: int
    n: int
    rank: int
    names: list[str]
    error: Tensor  # (B, m, n) fp32 error buffers E_i [P E.2(2)]; the paper stores them in 1-6-9
    q: Tensor  # (B, n, r) fixed Gaussian Q [P §2.5 fn 10]


@dataclass
class _Work:
    """One batch's share of a ``reduce`` call."""

    batch: _Batch
    idx: Tensor | None  # positions in the batch; None when every matrix of the batch is present, in order
    names: list[str]
    e: Tensor  # (B', m, n) error buffers, gradient added
    g_ok: Tensor  # (B',) finite gradients
    p: Tensor = _EMPTY  # (B', m, r) Σ_i E_i·Q
    p_hat: Tensor = _EMPTY  # (B', m, r) orthonormal columns
    pq_ok: Tensor = _EMPTY  # (B',) P (then also Q) finite
    q: Tensor = _EMPTY  # (B', n, r) Σ_i E_iᵀ·P̂ / W


class PowerSGDReducer:
    """PowerSGD across the replicas of ``group`` with a fixed Q, error feedback and Householder orthogonalization.

    ``params`` maps names to parameters (or shapes); each rank passes the same names in the same order, and a
    matrix may be a full gradient or this rank's shard of one. ``rank`` is the rank per matrix (see
    :func:`resolve_rank`). ``max_norm``: global-norm clip (4 [P B.2]; None disables). ``reduce`` and
    ``state_dict``/``load_state_dict`` are collectives over ``group``: every replica calls them together.
    """

    def __init__(
        self,
        params: Mapping[str, Tensor | Sequence[int]],
        rank: int,
        group: ProcessGroup | None = None,
        *,
        eps: float = 1e-6,
        seed: int = 0,
        max_norm: float | None = 4.0,
        min_compression_rate: float = 1.0,
        uncompressed_prefixes: Sequence[str] = UNCOMPRESSED_PREFIXES,
        device: torch.device | str | None = None,
    ) -> None:
        shapes = {k: (v.shape if isinstance(v, Tensor) else torch.Size(v)) for k, v in params.items()}
        if device is None:
            device = next((v.device for v in params.values() if isinstance(v, Tensor)), torch.device("cpu"))
        self.group, self.rank, self.eps, self.seed, self.max_norm = group, rank, eps, seed, max_norm
        self.shapes = shapes
        self.plans, self.uncompressed = compression_plan(shapes, rank, min_compression_rate, uncompressed_prefixes)
        self.batches: dict[tuple[int, int, int], _Batch] = {}
        self.slots: dict[str, tuple[tuple[int, int, int], int]] = {}  # name → (batch key, index in batch)
        for name, p in self.plans.items():
            key = (p.m, p.n, p.rank)
            batch = self.batches.setdefault(key, _Batch(p.m, p.n, p.rank, [], torch.empty(0), torch.empty(0)))
            self.slots[name] = (key, len(batch.names))
            batch.names.append(name)
        for b in self.batches.values():
            b.error = torch.zeros(len(b.names), b.m, b.n, device=device)  # (B, m, n)
            b.q = torch.stack([fixed_q(nm, b.n, b.rank, seed) for nm in b.names]).to(device)  # (B, n, r)

    @classmethod
    def from_config(
        cls,
        params: Mapping[str, Tensor | Sequence[int]],
        comm: CommConfig,
        d_model: int,
        group: ProcessGroup | None = None,
        *,
        shards: int = 1,
        max_norm: float | None = 4.0,
    ) -> "PowerSGDReducer":
        return cls(
            params,
            resolve_rank(comm, d_model, shards),
            group,
            eps=comm.powersgd_eps,
            seed=comm.powersgd_seed,
            max_norm=max_norm,
            min_compression_rate=comm.powersgd_min_compression_rate,
        )

    # ---- the per-step algorithm ------------------------------------------------------------------

    def _matrix(self, name: str, g: Tensor) -> Tensor:
        p = self.plans[name]
        mat = g.detach().reshape(p.shape[0], -1)  # (rows, cols)
        return mat.T if p.transpose else mat  # (m, n)

    def _stack(self, grads: Mapping[str, Tensor]) -> list[_Work]:
        """[P E.2(2)] Per batch present in ``grads``: add the finite gradients into the error buffers."""
        present: dict[tuple[int, int, int], list[str]] = {}
        for name in grads:
            if name in self.slots:
                present.setdefault(self.slots[name][0], []).append(name)
        work = []
        for key, names in present.items():
            b = self.batches[key]
            pos = [self.slots[nm][1] for nm in names]
            idx = None if pos == list(range(len(b.names))) else torch.tensor(pos, device=b.error.device)
            e = b.error if idx is None else b.error[idx]  # (B', m, n): the storage itself when all are present
            g = torch.stack([self._matrix(nm, grads[nm]) for nm in names]).float()  # (B', m, n)
            ok = finite_rows(g)  # (B',)
            e.add_(torch.where(ok[:, None, None], g, 0.0))  # only finite gradients enter E [P E.2(2)]
            work.append(_Work(b, idx, names, e, ok))
        return work

    def reduce(self, grads: Mapping[str, Tensor]) -> ReduceResult:
        """One replica reduction of ``grads`` (any subset of the names, the same subset on every replica)."""
        unknown = [n for n in grads if n not in self.shapes]
        if unknown:
            raise KeyError(f"gradients {unknown[:3]} were not given to PowerSGDReducer(params=...)")
        if not grads:
            raise ValueError("reduce() needs at least one gradient")
        world = group_size(self.group)
        work = self._stack(grads)
        # [P E.2(8)] one fp32 all-reduce of every uncompressed gradient, started first to overlap the compression;
        # its last slot carries this replica's nonfinite flag [P E.2(10)] (a sum of 0/1 flags is exact).
        unc = {n: g for n, g in grads.items() if n not in self.slots}
        device = next(iter(grads.values())).device
        flat = torch.cat([g.detach().reshape(-1).float() for g in unc.values()] + [torch.zeros(1, device=device)])
        bad = [~finite_rows(flat[None, :-1])[0]] + [(~w.g_ok).any().to(device) for w in work]
        flat[-1] = torch.stack(bad).any().float()  # (N_u + 1,)
        pending = _all_reduce_sum(flat, self.group, async_op=True)
        # [P E.2(3-7)] P = Σ E·Q → P̂ = orth(P) → Q = Σ Eᵀ·P̂ / W; each step is one all-reduce over all batches.
        ps = [torch.bmm(w.e, w.batch.q if w.idx is None else w.batch.q[w.idx]) for w in work]  # (B', m, r) each
        p_flat = self._all_reduce_cat(work, ps)
        for w in work:
            w.p_hat, w.pq_ok = self._orthogonalize(w.p)
        q_flat = self._all_reduce_cat(work, [torch.bmm(w.e.transpose(1, 2), w.p_hat) for w in work], field="q")
        q_flat /= world
        if pending is not None:
            pending.wait()
        flat[:-1] /= world
        # [P E.2(9)] norm² = Σ‖Q‖² (P̂ has orthonormal columns, so ‖P̂Qᵀ‖ = ‖Q‖) + Σ‖g‖² of the uncompressed.
        norm_sq = float(torch.linalg.vector_norm(flat[:-1], dtype=torch.float64)) ** 2
        for w in work:
            norm_sq += float(torch.linalg.vector_norm(w.q, dtype=torch.float64)) ** 2
            w.pq_ok &= finite_rows(w.q)
        norm = math.sqrt(norm_sq)
        finite = float(flat[-1]) == 0 and all(bool(w.pq_ok.all()) for w in work) and math.isfinite(norm)
        coef = _clip_coef(norm, self.max_norm)
        out = _split(flat[:-1] * coef, {n: g.shape for n, g in unc.items()})
        for w in work:
            update = torch.bmm(w.p_hat, w.q.transpose(1, 2))  # (B', m, n): decompressed in fp32 [P E.2(11)]
            self._update_error(w, update)
            for i, name in enumerate(w.names):
                mat = update[i].T if self.plans[name].transpose else update[i]  # (rows, cols)
                out[name] = (mat * coef).reshape(self.shapes[name])
        sent = 4 * (p_flat.numel() + q_flat.numel() + flat.numel())
        full = 4 * sum(g.numel() for g in grads.values())
        grads_out = {n: out[n] for n in grads}
        return ReduceResult(grads_out, norm if finite else math.inf, coef, finite, {"sent": sent, "uncompressed": full})

    def _all_reduce_cat(self, work: list[_Work], parts: list[Tensor], field: str = "p") -> Tensor:
        """Sum ``parts`` over the replicas in one grouped all-reduce [P E.2(4, 7)]; ``w.<field>`` views the result."""
        flat = torch.cat([t.reshape(-1) for t in parts]) if parts else torch.zeros(0)
        _all_reduce_sum(flat, self.group)
        offset = 0
        for w, t in zip(work, parts):
            setattr(w, field, flat[offset : offset + t.numel()].view_as(t))  # p: (B', m, r), q: (B', n, r)
            offset += t.numel()
        return flat

    def _orthogonalize(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """P (B, m, r) → (P̂ (B, m, r) fp32, finite (B,)). A nonfinite P is replaced by 0 before the QR."""
        ok = finite_rows(p)  # (B,)
        p = torch.where(ok[:, None, None], p, 0.0)
        # The paper scales P by preset constants [P E.2(3)] that it does not give; we scale each P to max |P| = 1,
        # which leaves its span unchanged and makes ε·I a relative perturbation of ε.
        scale = p.abs().amax(dim=(1, 2), keepdim=True)  # (B, 1, 1)
        p = p / torch.where(scale > 0, scale, 1.0)
        return householder_orthogonalize(p, self.eps).to(torch.float32), ok  # (B, m, r)

    @staticmethod
    def _update_error(w: _Work, update: Tensor) -> None:
        """[P E.2(12)] E −= P̂·Qᵀ if P and Q are finite; else keep E if finite; else zero it."""
        if bool(w.pq_ok.all()):
            w.e.sub_(update)
        else:
            e_ok = finite_rows(w.e)[:, None, None]  # (B', 1, 1)
            w.e.copy_(torch.where(w.pq_ok[:, None, None], w.e - update, torch.where(e_ok, w.e, 0.0)))
        if w.idx is not None:
            w.batch.error[w.idx] = w.e

    # ---- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Collective. Only Σ_i E_i is stored, in each gradient's own shape [P E.2 notes]; Q is regenerated."""
        sums: dict[str, Tensor] = {}
        for b in self.batches.values():
            total = b.error.clone()  # (B, m, n)
            _all_reduce_sum(total, self.group)
            for i, name in enumerate(b.names):
                mat = total[i].T if self.plans[name].transpose else total[i]
                sums[name] = mat.reshape(self.shapes[name]).cpu()
        return {"error_sum": sums, "replicas": group_size(self.group), "powersgd_rank": self.rank, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Collective. Every replica sets E_i = Σ E / replicas-at-save-time, broadcast from the group's first rank.

        On the same replica count this is the paper's rule [P E.2 notes]; on another count it keeps the mean
        residual, which is what the next updates apply. The rank and seed may differ from the saved ones.
        """
        sums, replicas = state["error_sum"], int(state["replicas"])
        missing = sorted(set(self.plans) - set(sums))
        extra = sorted(set(sums) - set(self.plans))
        if missing or extra:
            raise ValueError(
                f"PowerSGD state does not match the compressed matrices: missing {missing[:3]}, unexpected "
                f"{extra[:3]}; the parameter names or the compression plan (rank, min_compression_rate) changed"
            )
        for b in self.batches.values():
            for i, name in enumerate(b.names):
                t = sums[name].to(b.error.device, torch.float32) / replicas
                if t.shape != self.shapes[name]:
                    raise ValueError(f"PowerSGD state {name}: shape {tuple(t.shape)} != {tuple(self.shapes[name])}")
                mat = t.reshape(t.shape[0], -1)
                b.error[i] = mat.T if self.plans[name].transpose else mat
            if group_size(self.group) > 1:
                dist.broadcast(b.error, group=self.group, group_src=0)


# --------------------------------------------------------------------------------------------------
# Engine entry point and the DDP comm hook for plain data-parallel users
# --------------------------------------------------------------------------------------------------


def build_replica_reducer(
    comm: CommConfig,
    params: Mapping[str, Tensor | Sequence[int]],
    d_model: int,
    group: ProcessGroup | None = None,
    *,
    shards: int = 1,
    max_norm: float | None = 4.0,
) -> AllReduceReducer | PowerSGDReducer:
    """``comm.replica_reduce``: "allreduce" → :class:`AllReduceReducer`, "powersgd" → :class:`PowerSGDReducer`."""
    if comm.replica_reduce == "allreduce":
        return AllReduceReducer(group, max_norm)
    if comm.replica_reduce == "powersgd":
        return PowerSGDReducer.from_config(params, comm, d_model, group, shards=shards, max_norm=max_norm)
    raise ValueError(f"comm.replica_reduce={comm.replica_reduce!r}: choose 'allreduce' or 'powersgd'")


class PowerSGDHookState:
    """State of :func:`powersgd_comm_hook`: a :class:`PowerSGDReducer` over ``model``'s parameters.

    ``max_norm`` is None: a bucket holds only part of the model, so clipping (``clip_grad_norm_``) and skipping
    nonfinite steps stay with the user, as with plain DDP. Error buffers are keyed by parameter name, so DDP's
    bucket rebuild after the first iteration does not disturb them (torch's hook keys them by bucket index).
    """

    def __init__(self, model: nn.Module, rank: int, group: ProcessGroup | None = None, **kwargs: Any) -> None:
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        named = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.names = {id(p): n for n, p in named.items()}
        self.reducer = PowerSGDReducer(named, rank, group, max_norm=None, **kwargs)


def powersgd_comm_hook(state: PowerSGDHookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP comm hook: ``ddp.register_comm_hook(PowerSGDHookState(model, rank=r), powersgd_comm_hook)``.

    Reduces the bucket's per-parameter gradient views (local gradients; DDP does not pre-divide them) with the
    fixed-Q, error-feedback, Householder PowerSGD above and writes the averaged result back into the bucket.
    """
    named = {state.names[id(p)]: g for p, g in zip(bucket.parameters(), bucket.gradients())}
    state.reducer.reduce(named).copy_into(named)
    fut: torch.futures.Future[Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut
