"""``parallel.pp_reshard``: with pp=2 × shard=2 under gloo, resharding and reduce-scattering after every microbatch
gives the gradients of torch's keep-gathered path (1F1B and interleaved 1F1B), and really reduce-scatters per
microbatch: FSDP2's ``foreach_reduce`` runs once per unit and microbatch instead of once per unit and step."""

from __future__ import annotations

import pytest
import torch
from _spawn import run_distributed

from dalle_dist.config import build_config

STEPS = 3


def worker(rank: int, world: int, out: str, reshard: str, schedule: str) -> dict:
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    from dalle_dist.train.prior import PriorTrainer, _local

    calls = {"n": 0}
    real = _fsdp_param_group.foreach_reduce

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - passes through to FSDP2
        calls["n"] += 1
        return real(*args, **kwargs)

    _fsdp_param_group.foreach_reduce = counting
    over = {"parallel.topology": "pp=2,shard=2", "parallel.n_microbatches": "4", "parallel.pp_reshard": reshard,
            "parallel.schedule": schedule, "parallel.virtual_stages": "2" if schedule == "interleaved1f1b" else "1",
            "train.out_dir": out, "train.progress": "false"}  # fmt: skip
    trainer = PriorTrainer(build_config("prior", ["configs/prior/tiny.yaml"], over)).build()
    trainer.step()  # the first step also runs pipelining's shape inference
    calls["n"] = 0
    losses = [trainer.step()["loss"] for _ in range(STEPS - 1)]
    weights = {n: _local(p).detach().clone() for n, p in trainer.named.items()}
    return {"losses": losses, "reduces_per_step": calls["n"] / (STEPS - 1), "weights": weights}


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved1f1b"])
def test_microbatch_reshard_matches_the_keep_gathered_path(tmp_path, schedule):
    step = run_distributed(worker, 4, str(tmp_path / "a"), "step", schedule, timeout=120)
    micro = run_distributed(worker, 4, str(tmp_path / "b"), "microbatch", schedule, timeout=120)
    for a, b in zip(step, micro):
        assert b["losses"] == pytest.approx(a["losses"], rel=1e-6)
        for name, w in a["weights"].items():
            torch.testing.assert_close(b["weights"][name], w, rtol=1e-5, atol=1e-6, msg=name)
        # 4 microbatches: every FSDP unit of the rank's stages reduce-scatters 4 times instead of once.
        assert a["reduces_per_step"] > 0 and b["reduces_per_step"] == 4 * a["reduces_per_step"]
