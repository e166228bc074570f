"""PowerSGD across replicas on 2 and 4 gloo ranks: exactness at full rank, error feedback, nonfinite flags,
checkpoints of the summed error buffers, torch's powerSGD_hook as an oracle, the DDP comm hook, byte accounting.

Functions named ``_on_*`` run inside each rank (see ``_spawn.py``); the test functions check what they return.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _spawn import run_distributed
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook
from torch.testing import assert_close

from dalle_dist.config import CommConfig, ConfigError, model_config
from dalle_dist.models.prior import DallePrior
from dalle_dist.parallel.powersgd import (
    PowerSGDHookState,
    PowerSGDReducer,
    build_replica_reducer,
    compression_plan,
    plain_allreduce,
    powersgd_bytes,
    powersgd_comm_hook,
    resblock_shapes,
    resolve_rank,
)


def _prior_grads(model: DallePrior, seed: int) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, cfg.text_vocab, (2, cfg.caption_len), generator=g)
    image = torch.randint(0, cfg.image_vocab, (2, cfg.image_len), generator=g)
    model.zero_grad()
    model.loss(text, image)[0].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# ---- full rank: PowerSGD is the plain all-reduce average --------------------------------------------------


def _on_full_rank(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = DallePrior(model_config("prior", "tiny"))
    red = PowerSGDReducer(dict(model.named_parameters()), rank=10_000, min_compression_rate=0, max_norm=0.5)
    diffs, norms, finite = [], [], []
    for step in range(3):
        grads = _prior_grads(model, seed=100 * step + rank)
        ours, ref = red.reduce(grads), plain_allreduce(grads, max_norm=0.5)
        diffs.append(max(float((ours.grads[n] - ref.grads[n]).abs().max()) for n in grads))
        norms.append((ours.global_norm, ref.global_norm, ours.clip_coef, ref.clip_coef))
        finite.append(ours.finite and ref.finite)
    scale = max(float(g.abs().max()) for g in grads.values())
    # Each E_i keeps g_i − mean (replica-local noise); only the sum over replicas must vanish at full rank.
    error = max(float(e.abs().max()) for e in red.state_dict()["error_sum"].values())
    return dict(diffs=diffs, norms=norms, finite=finite, scale=scale, error=error, n=len(red.plans))


@pytest.mark.parametrize("world", [2, 4])
def test_full_rank_equals_plain_allreduce(world: int) -> None:
    for out in run_distributed(_on_full_rank, world):
        assert out["n"] == 24  # every resblock weight matrix of the 4-layer prior is compressed
        assert max(out["diffs"]) <= 1e-5 * out["scale"], out
        assert out["error"] <= 1e-5 * out["scale"]  # full rank leaves no residual in Σ_i E_i
        for ours, ref, c_ours, c_ref in out["norms"]:
            assert ours == pytest.approx(ref, rel=1e-5)
            assert c_ours == pytest.approx(c_ref, rel=1e-5) and c_ours < 1  # clipping engaged, identically
        assert all(out["finite"])


# ---- low rank: error feedback makes the accumulated update track the accumulated gradient ----------------


def _on_error_feedback(rank: int, world: int, steps: int) -> dict:
    m, n, r = 16, 32, 4
    signal = torch.randn(m, n, generator=torch.Generator().manual_seed(0))  # full rank, shared by the replicas
    noise = torch.Generator().manual_seed(1 + rank)
    red = PowerSGDReducer({"w": (m, n)}, rank=r, max_norm=None)
    no_ef = PowerSGDReducer({"w": (m, n)}, rank=r, max_norm=None)  # its error buffer is zeroed every step
    true, applied, applied_no_ef = torch.zeros(m, n), torch.zeros(m, n), torch.zeros(m, n)
    rel = {}
    for t in range(1, steps + 1):
        g = signal + 0.5 * torch.randn(m, n, generator=noise)
        mean_g = g.clone()
        dist.all_reduce(mean_g)
        true += mean_g / world
        applied += red.reduce({"w": g}).grads["w"]
        no_ef.batches[(m, n, r)].error.zero_()
        applied_no_ef += no_ef.reduce({"w": g}).grads["w"]
        if t in (steps // 2, steps):
            rel[t] = (float((applied - true).norm() / true.norm()), float((applied_no_ef - true).norm() / true.norm()))
    mean_error = red.state_dict()["error_sum"]["w"] / world
    return dict(rel=rel, identity=float((true - applied - mean_error).abs().max()), scale=float(true.abs().max()))


def test_error_feedback_tracks_accumulated_gradient() -> None:
    steps = 80
    out = run_distributed(_on_error_feedback, 2, steps)[0]
    # Σ applied = Σ mean gradient − mean residual, exactly: nothing is lost, only delayed.
    assert out["identity"] <= 1e-4 * out["scale"]
    (half, half_no_ef), (end, end_no_ef) = out["rel"][steps // 2], out["rel"][steps]
    assert end < half < half_no_ef  # the gap closes over time with error feedback ...
    assert end_no_ef > 0.6 and end < 0.5 * end_no_ef  # ... and stays at the rank-r truncation without it


# ---- nonfinite flags: every replica skips together, and E follows [P E.2(12)] --------------------------


def _on_nonfinite(rank: int, world: int) -> dict:
    shapes = {"a.weight": (8, 16), "b.weight": (8, 16), "a.bias": (8,)}
    red = PowerSGDReducer(shapes, rank=2)
    gen = torch.Generator().manual_seed(rank)
    key = (8, 16, 2)
    log = {}
    for step, case in enumerate(["ok", "nan_matrix", "ok", "nan_bias", "inf_error", "ok"]):
        grads = {n: torch.randn(*s, generator=gen) for n, s in shapes.items()}
        if case == "nan_matrix" and rank == 1:
            grads["a.weight"][0, 0] = math.nan
        if case == "nan_bias" and rank == 0:
            grads["a.bias"][3] = math.inf
        if case == "inf_error" and rank == 0:
            red.batches[key].error[0, 0, 0] = math.inf  # E of "a.weight" on rank 0 only
        before = red.batches[key].error.clone()
        res = red.reduce(grads)
        after = red.batches[key].error
        log[f"{step}:{case}"] = dict(
            finite=res.finite,
            norm=res.global_norm,
            a_zeroed=bool((after[0] == 0).all()),
            b_changed=bool((after[1] != before[1]).any()),
            e_finite=bool(torch.isfinite(after).all()),
        )
    return log


def test_nonfinite_flags_are_synchronised() -> None:
    logs = run_distributed(_on_nonfinite, 2)
    assert logs[0].keys() == logs[1].keys()
    for k in logs[0]:
        case = k.split(":")[1]
        assert logs[0][k]["finite"] == logs[1][k]["finite"] == (case == "ok"), (k, logs)
        assert math.isinf(logs[0][k]["norm"]) == (case != "ok")
        assert all(log[k]["e_finite"] for log in logs)  # no replica ever keeps a nonfinite error buffer
    inf_case = next(k for k in logs[0] if k.endswith("inf_error"))
    assert logs[0][inf_case]["a_zeroed"]  # P nonfinite and E nonfinite → E zeroed (rank 0) ...
    assert not logs[1][inf_case]["a_zeroed"]  # ... a finite E is kept (rank 1)
    assert logs[0][inf_case]["b_changed"]  # the other matrix of the batch updates normally


# ---- checkpoints: only Σ_i E_i is stored; a resumed run applies the same updates ------------------------


def _on_state_dict(rank: int, world: int) -> dict:
    shapes = {"w1": (12, 20), "w2": (20, 12), "w3": (12, 20), "bias": (20,)}

    def grads_at(step: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(1000 * step + rank)
        return {n: torch.randn(*s, generator=gen) for n, s in shapes.items()}

    straight = PowerSGDReducer(shapes, rank=3)
    updates_a = [straight.reduce(grads_at(t)).grads for t in range(6)]
    first = PowerSGDReducer(shapes, rank=3)
    for t in range(3):
        first.reduce(grads_at(t))
    own_error = {n: first.batches[first.slots[n][0]].error[first.slots[n][1]].clone() for n in first.plans}
    saved = first.state_dict()
    resumed = PowerSGDReducer(shapes, rank=3)
    resumed.load_state_dict(saved)
    updates_b = [resumed.reduce(grads_at(t)).grads for t in range(3, 6)]
    diff = max(float((a[n] - b[n]).abs().max()) for a, b in zip(updates_a[3:], updates_b) for n in shapes)
    return dict(diff=diff, saved=saved, own_error=own_error, transposed=first.plans["w2"].transpose)


def test_state_dict_stores_sum_and_resume_matches() -> None:
    outs = run_distributed(_on_state_dict, 2)
    assert outs[0]["transposed"]
    for out in outs:
        assert out["diff"] <= 1e-5, out["diff"]
        assert out["saved"]["replicas"] == 2
    for name, total in outs[0]["saved"]["error_sum"].items():
        assert total.shape == {"w1": (12, 20), "w2": (20, 12), "w3": (12, 20)}[name]
        own = sum(out["own_error"][name] for out in outs)  # (m, n) orientation
        assert_close(total, own.T if name == "w2" else own, rtol=1e-5, atol=1e-6)
        assert_close(outs[1]["saved"]["error_sum"][name], total)  # the same on every replica
    # Resuming on another replica count keeps the mean residual: E_i = Σ E / replicas at save time.
    local = PowerSGDReducer({"w1": (12, 20), "w2": (20, 12), "w3": (12, 20), "bias": (20,)}, rank=3)
    local.load_state_dict(outs[0]["saved"])
    slot = local.slots["w1"]
    assert_close(local.batches[slot[0]].error[slot[1]], outs[0]["saved"]["error_sum"]["w1"] / 2)


# ---- torch's powerSGD_hook as an oracle ---------------------------------------------------------------


class _Bucket:
    """The parts of ``dist.GradBucket`` that torch's hook uses, over one flat buffer."""

    def __init__(self, grads: list[torch.Tensor]) -> None:
        self.buf = torch.cat([g.reshape(-1) for g in grads])
        self.views, offset = [], 0
        for g in grads:
            self.views.append(self.buf[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def buffer(self) -> torch.Tensor:
        return self.buf

    def gradients(self) -> list[torch.Tensor]:
        return self.views

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True


def _on_torch_oracle(rank: int, world: int, r: int, steps: int) -> dict:
    # rows ≤ cols, so neither implementation transposes; a bias goes through both uncompressed paths.
    shapes = {"w1": (6, 10), "w2": (6, 10), "w3": (4, 12), "bias": (10,)}
    seed = 7
    kwargs = dict(min_compression_rate=0, use_error_feedback=True, warm_start=False, random_seed=seed)
    state = PowerSGDState(None, matrix_approximation_rank=r, start_powerSGD_iter=2, **kwargs)
    state.iter = 2  # past torch's vanilla all-reduce warm-up
    ours = PowerSGDReducer(shapes, rank=r, min_compression_rate=0, max_norm=None)
    rng = np.random.RandomState(seed)  # mirrors state.rng: torch's hook draws a new Q per step (warm_start=False)
    gen = torch.Generator().manual_seed(rank)
    diffs = []
    for _ in range(steps):
        grads = {n: torch.randn(*s, generator=gen) for n, s in shapes.items()}
        with torch.random.fork_rng():
            torch.manual_seed(rng.randint(1_000_000_000))
            for name in ("w1", "w2", "w3"):  # torch's order: grouped by shape, then bucket order
                key, i = ours.slots[name]
                ours.batches[key].q[i] = torch.randn(1, shapes[name][1], min(r, shapes[name][0]))[0]
        bucket = _Bucket([grads[n] for n in shapes])
        expected = powerSGD_hook(state, bucket).wait()
        reduced = ours.reduce(grads).grads
        got = torch.cat([reduced[n].reshape(-1) for n in shapes])
        diffs.append(float((got - expected).abs().max() / expected.abs().max()))
    return dict(diffs=diffs)


@pytest.mark.parametrize("r", [3, 100])  # rank 3: torch's QR path (rank > 2), same Q span; 100: full rank
def test_agrees_with_torch_powersgd_hook(r: int) -> None:
    for out in run_distributed(_on_torch_oracle, 2, r, 4):
        assert max(out["diffs"]) <= 1e-4, out["diffs"]  # ε·I is the only difference in the algorithm


# ---- the DDP comm hook --------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)  # stays uncompressed
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 12)
        self.out = nn.Linear(12, 8)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(self.embed(idx))))))


def _on_ddp(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    results, residual = {}, {}
    for variant, r in (("plain", 0), ("full", 64), ("low", 2)):
        torch.manual_seed(0)
        net = _Net()
        ddp = DDP(net, bucket_cap_mb=1e-4)  # tiny buckets: several hook calls per step
        if r:
            state = PowerSGDHookState(net, rank=r, min_compression_rate=0)
            ddp.register_comm_hook(state, powersgd_comm_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(3):
            idx = torch.randint(0, 10, (5,), generator=gen)
            opt.zero_grad()
            ddp(idx).square().mean().backward()
            opt.step()
        results[variant] = {n: p.detach().clone() for n, p in net.named_parameters()}
        if r:  # the hook ran: E_i holds g_i − mean at full rank, the truncation too at low rank
            residual[variant] = max(float(b.error.abs().max()) for b in state.reducer.batches.values())
    return dict(results=results, residual=residual)


def test_ddp_comm_hook_full_rank_matches_plain_ddp() -> None:
    outs = run_distributed(_on_ddp, 2)
    for out in outs:
        assert set(out["residual"]) == {"full", "low"} and min(out["residual"].values()) > 0
        for name, p in out["results"]["plain"].items():
            assert_close(out["results"]["full"][name], p, rtol=1e-5, atol=1e-6)
        assert any(not torch.allclose(out["results"]["low"][n], p) for n, p in out["results"]["plain"].items())
    for variant in ("full", "low"):  # replicas stay in sync
        for name, p in outs[0]["results"][variant].items():
            assert_close(outs[1]["results"][variant][name], p)


# ---- single process: compression plan, rank from config, byte accounting -------------------------------


def test_compression_plan_on_the_prior() -> None:
    model = DallePrior(model_config("prior", "tiny"))  # d = 64, rank 14 from the default fraction 896/3968
    shapes = {n: p.shape for n, p in model.named_parameters()}
    plans, rest = compression_plan(shapes, resolve_rank(CommConfig(), 64))
    assert set(plans) == {n for n in shapes if n.startswith("resblocks.") and n.endswith("weight") and "ln" not in n}
    assert all(n.startswith(("embed.", "head.")) or shapes[n].numel() == shapes[n][-1] for n in rest)
    assert plans["resblocks.1.fc1.weight"].transpose and plans["resblocks.1.fc1.weight"].rank == 14
    # a matrix where r(m + n) ≥ mn is sent uncompressed
    plans, rest = compression_plan({"small": (4, 6), "big": (64, 64)}, rank=3)
    assert list(plans) == ["big"] and rest == ["small"]


def test_rank_from_config() -> None:
    assert resolve_rank(CommConfig(powersgd_rank=896), 3968, shards=8) == 112  # [P B.2]
    assert resolve_rank(CommConfig(), 3968) == 896
    assert resolve_rank(CommConfig(powersgd_rank_fraction=0.3), 1280) == 384
    with pytest.raises(ConfigError):
        CommConfig(powersgd_rank=0, powersgd_rank_fraction=0.0).validate()
    with pytest.raises(ConfigError):
        CommConfig(replica_reduce="gossip").validate()
    red = build_replica_reducer(CommConfig(replica_reduce="powersgd"), {"w": (64, 64)}, d_model=64)
    assert isinstance(red, PowerSGDReducer) and red.rank == 14


@pytest.mark.parametrize(("d", "r", "rate"), [(1920, 512, 0.833), (2688, 640, 0.851), (3968, 896, 0.859)])
def test_table1_compression_rates(d: int, r: int, rate: float) -> None:
    out = powersgd_bytes(resblock_shapes(d, 64), r, shards=8)
    assert out["saved_fraction"] == pytest.approx(1 - r * (8 + 2) / (2 * d * 8), rel=1e-12)
    assert out["saved_fraction"] == pytest.approx(1 - 5 * r / (8 * d), rel=1e-12)  # [P Table 1]
    assert round(out["saved_fraction"], 3) == rate
    assert out["bytes_uncompressed"] == 2 * 12 * 64 * d * d // 8  # 12 d²/m per layer [P Table 2]


def test_local_mode_without_process_group() -> None:
    red = PowerSGDReducer({"w": (8, 8), "b": (8,)}, rank=8, min_compression_rate=0, max_norm=None)
    g = {"w": torch.randn(8, 8), "b": torch.randn(8)}
    res = red.reduce(g)
    assert_close(res.grads["w"], g["w"], rtol=1e-5, atol=1e-6)
    assert res.finite and res.bytes_sent["uncompressed"] == 4 * 72
