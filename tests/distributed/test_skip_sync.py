"""Two gloo ranks: a nonfinite gradient on one rank skips the update on every rank [P D.1, E.2(10)].

Rank 1 plants an Inf inside resblock "1"; after ``sync_finite_flags`` both ranks skip, both divide only that
resblock's scale, and neither changes its weights or Adam moments. CPU, via the shared ``_spawn`` helper.
"""

import math

import pytest
import torch
from _spawn import run_distributed

from dalle_dist.config import PrecisionConfig, PriorModelConfig
from dalle_dist.models.prior import DallePrior
from dalle_dist.precision import (
    ResblockGradScaler,
    ShardedAdamW32,
    apply_stage_precision,
    grads_by_block,
    sync_finite_flags,
)

MICRO = dict(n_layers=2, d_model=32, n_heads=2, text_len=8, text_vocab=64, grid=4, image_vocab=64, conv_kernel=3)
WORLD = 2


def plant_inf(model: DallePrior, key: str) -> None:
    def hook(mod, args, out):
        out.register_hook(lambda g: g * math.inf)

    model.resblocks[key].fc2.register_forward_hook(hook)


def step(model, scaler, opt, rank: int) -> tuple[bool, dict[str, bool], dict[str, bool]]:
    cfg = model.cfg
    g = torch.Generator().manual_seed(100 + rank)  # each replica its own data
    text = torch.randint(1, cfg.text_vocab, (2, cfg.caption_len), generator=g)
    image = torch.randint(0, cfg.image_vocab, (2, cfg.image_len), generator=g)
    opt.zero_grad(set_to_none=True)
    (model.loss(text, image)[0] / WORLD).backward()  # ÷ M: the loss over the global batch [P D.3]
    local, _ = scaler.unscale_(grads_by_block(model.named_parameters()))  # in place, fp32
    synced = sync_finite_flags(local)
    applied = scaler.update(synced)
    if applied:
        opt.step()
    return applied, local, synced


def worker(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = DallePrior(PriorModelConfig(**MICRO))
    cfg = PrecisionConfig(dtype="fp16")
    policy = apply_stage_precision(model, cfg)
    scaler = ResblockGradScaler(list(model.resblocks), cfg, replicas=world)
    scaler.attach(model)
    low = [p for n, p in model.named_parameters() if n in set(policy.low_params)]
    opt = ShardedAdamW32(model.parameters(), low, lr=1e-3)
    first = step(model, scaler, opt, rank)  # a normal update: Adam moments exist afterwards
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    if rank == 1:
        plant_inf(model, "1")
    applied, local, synced = step(model, scaler, opt, rank)
    unchanged = all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    unchanged &= all(
        torch.equal(v, moments[i][k]) for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()
    )
    return dict(
        first=first[0], applied=applied, local=local, synced=synced, unchanged=unchanged, state=scaler.state_dict()
    )


def test_planted_inf_on_one_rank_skips_on_every_rank():
    r = run_distributed(worker, WORLD)
    assert r[0]["first"] and r[1]["first"]
    assert all(r[0]["local"].values()) and r[1]["local"]["1"] is False  # only rank 1 saw the Inf …
    assert r[0]["synced"] == r[1]["synced"] and r[0]["synced"]["1"] is False  # … both ranks act on it
    assert not r[0]["applied"] and not r[1]["applied"]
    assert r[0]["unchanged"] and r[1]["unchanged"]  # weights and Adam moments bit-identical
    assert r[0]["state"] == r[1]["state"]  # the replicas' scales stay equal
    log2 = dict(zip(r[0]["state"]["keys"], (math.log2(s) for s in r[0]["state"]["scales"])))
    assert log2["1"] == pytest.approx(1 + 13 + 0.001 - 0.5)  # M = 2: init 2·2^13
    assert all(log2[k] == pytest.approx(1 + 13 + 0.002) for k in ("0", "2", "3"))
