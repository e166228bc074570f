"""``dalle-dist plan --dry-run``: real stages on the meta device under a fake process group, and the arithmetic."""

import json
import math
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from dalle_dist.config import ConfigError, model_config
from dalle_dist.parallel.pipeline import bubble_fraction
from dalle_dist.parallel.topology import Topology
from dalle_dist.plan_dry_run import (
    GIB,
    DryRunOptions,
    dry_run,
    format_dry_run,
    in_flight,
    in_flight_per_stage,
    shard_sizes,
    shard_stages,
    usable_bytes,
)

TINY = dict(flavor="tiny", global_batch=16)


def _persistent(m: dict) -> int:
    return m["params"] + m["optimizer"] + m["ema"] + m["error_buffers"]


def test_json_keys_and_total_is_the_peak_of_its_parts():
    r = dry_run(DryRunOptions(topology="pp=2,replicate=2,shard=2", powersgd_rank=16, **TINY))
    m = r["per_rank_memory_bytes"]
    for key in ("params", "grads", "optimizer", "activations", "total", "comm_buffers", "error_buffers"):
        assert isinstance(m[key], int) and m[key] >= 0, key
    assert set(r["bytes_per_step"]) >= {"uncompressed", "powersgd"}
    assert isinstance(r["fits"], bool) and 0 < r["compression_rate"] < 1
    assert r["bubble_fraction"] == bubble_fraction(2, r["batch"]["microbatches"])
    for rank in r["ranks"]:
        mem, comm = rank["memory"], rank["comm_buffers_detail"]
        grads_in_backward = 0 if comm["mode"] == "stage_unsharded" else mem["grads"]
        phases = {
            "backward": mem["activations"] + mem["comm_buffers"] + grads_in_backward,
            "replica_reduce": mem["grads"] + mem["reduce_workspace"],
            "optimizer_step": mem["grads"] + mem["optimizer_workspace"],
        }
        assert mem["total"] == _persistent(mem) + max(phases.values())
        assert mem["peak_phase"] == max(phases, key=phases.__getitem__)
        act = rank["activations_detail"]
        assert act["total"] == act["held"] + act["pipeline_buffers"] + act["head"] + act["working"]
    assert m["total"] == max(rank["memory"]["total"] for rank in r["ranks"])
    json.dumps(r)  # one JSON object


def test_shards_over_every_rank_add_up_to_the_model():
    cfg = model_config("prior", "tiny")
    topo = Topology(pp=2, replicate=1, shard=3)  # 3 does not divide 64: FSDP2 pads, the last shard is smaller
    opts = DryRunOptions(topology=topo.describe(), flavor="tiny", global_batch=12)
    local = stage = 0
    for pp_rank in range(topo.pp):
        for shard_rank in range(topo.shard):
            params = [p for s in shard_stages(cfg, topo, pp_rank, opts, shard_rank) for p in s.params]
            local += sum(p.local_numel for p in params)
            if shard_rank == 0:
                stage += sum(p.numel for p in params)
                for p in params:  # shard rank 0 holds the largest chunk, which is what every rank pads to
                    assert p.padded_numel >= p.local_numel and p.padded_numel * topo.shard >= p.numel
    r = dry_run(opts)
    assert local == stage == r["params_total"] == sum(rank["params_numel_stage"] for rank in r["ranks"])
    assert shard_sizes(64, 3) == [22, 22, 20] and shard_sizes(2, 3) == [1, 1, 0]
    assert not dist.is_initialized()


def test_memory_shrinks_as_shard_grows():
    totals, states = [], []
    for shard in (1, 2, 4, 8):
        r = dry_run(
            DryRunOptions(flavor="small", topology=f"pp=1,replicate={8 // shard},shard={shard}", global_batch=8)
        )
        m = r["per_rank_memory_bytes"]
        totals.append(m["total"])
        states.append(m["params"] + m["grads"] + m["optimizer"])
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    assert states[0] / states[3] > 7  # the sharded states scale ~1/shard (the root unit stays whole)


def test_12b_on_1024_v100s():
    """The figures docs/scaling.md quotes: which 128 × 8 layouts fit a 16 GB V100, PowerSGD's rate [P Table 1]."""
    start = time.perf_counter()
    common = dict(flavor="12B", gpu="v100-16gb", powersgd_rank=896, nodes=128, gpus_per_node=8)
    pp2 = dry_run(DryRunOptions(topology="pp=2,replicate=64,shard=8", **common))
    assert not pp2["fits"]  # torch's pipelining keeps each stage unsharded through the backward: ~52 GiB
    assert pp2["ranks"][0]["comm_buffers_detail"]["mode"] == "stage_unsharded"
    assert pp2["paper_formats"]["fits"]  # in the paper's formats the same layout would fit
    assert pp2["bytes_per_step"]["powersgd_rank_per_gpu"] == 112  # 896 over 8 shards [P B.2]
    assert pp2["compression_rate_paper_layout"] == pytest.approx(1 - 5 * 896 / (8 * 3968), abs=1e-3)  # 0.859
    assert pp2["compression_rate_paper_layout"] == pytest.approx(0.859, abs=1e-3)
    # FSDP2 cuts fc2 (d, 4d) along d: P of its shard is (d/8 + 4d)·r, so the rate is 1 − 27r/(4d) per GPU rank r.
    assert pp2["compression_rate"] == pytest.approx(1 - 27 * 112 / (4 * 3968), rel=1e-9)
    pp16 = dry_run(DryRunOptions(topology="pp=16,replicate=8,shard=8", **common))
    assert pp16["fits"] and pp16["per_rank_memory_bytes"]["total"] < 12 * GIB
    assert not dry_run(DryRunOptions(topology="pp=1,replicate=1024,shard=1", **common))["fits"]
    paper_layout = dry_run(DryRunOptions(topology="pp=1,replicate=128,shard=8", fc2_shard_dim=1, **common))
    assert paper_layout["compression_rate"] == pytest.approx(0.859, abs=1e-3)  # with the paper's fc2 axis
    assert paper_layout["params_total"] == 12_292_840_960
    assert time.perf_counter() - start < 120


def test_topology_that_does_not_multiply_out_is_refused():
    with pytest.raises(ConfigError, match=r"pp=2 × replicate=64 × shard=8 = 1024 processes, but 800 were started"):
        dry_run(DryRunOptions(topology="pp=2,replicate=64,shard=8", nodes=100, gpus_per_node=8))
    with pytest.raises(ConfigError, match="1F1B needs parallel.n_microbatches >= pp"):
        dry_run(DryRunOptions(topology="pp=4,replicate=1,shard=1", flavor="tiny", global_batch=2))
    assert not dist.is_initialized()


def test_process_group_is_cleaned_up_and_runs_repeat():
    opts = DryRunOptions(topology="pp=2,replicate=1,shard=2", **TINY)
    first, second = dry_run(opts), dry_run(opts)
    assert not dist.is_initialized()
    first.pop("seconds"), second.pop("seconds")
    assert first == second


def test_defaults_pipeline_and_gpu_table():
    r = dry_run(DryRunOptions(topology="pp=2,replicate=2,shard=2", **TINY))
    assert r["batch"] == {
        "global": 16,
        "per_rank": 4,
        "microbatches": 4,
        "micro_batch": 1,
        "schedule": "1f1b",
        "virtual_stages": 1,
    }
    assert r["bubble_fraction"] == pytest.approx(1 / 5)
    assert [rank["in_flight"] for rank in r["ranks"]] == [[2], [1]]  # 1F1B: stage 0 holds pp microbatches
    assert in_flight(0, 4, 8, 2) == min((2 - 1) * 4 + 2 * 3 + 1, 16)  # torch's interleaved warm-up + 1
    # Interleaved, depth first: the last rank's first local stage holds a round, its last stage (the head) one.
    assert in_flight_per_stage(15, 16, 16, 2) == [16, 1] and in_flight_per_stage(0, 16, 16, 2) == [16, 16]
    assert usable_bytes("v100-16gb") == int(16 * GIB - GIB - 0.05 * 16 * GIB)
    with pytest.raises(ConfigError, match="unknown --gpu"):
        usable_bytes("v100")
    text = format_dry_run(r)
    assert "pp rank 0" in text and "pipeline bubble: 0.2000" in text


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dalle_dist", *args], capture_output=True, text=True, timeout=300)


def test_cli_dry_run():
    r = run_cli("plan", "--prior", "tiny", "--topology", "pp=2,replicate=2,shard=2", "--global-batch", "16",
                "--powersgd-rank", "16", "--dry-run", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["topology"]["world_size"] == 8 and math.isfinite(out["per_rank_memory_bytes"]["total"])
    r = run_cli(
        "plan", "--prior", "tiny", "--topology", "pp=2,replicate=2,shard=2", "--global-batch", "16", "--dry-run"
    )
    assert r.returncode == 0 and "DOES NOT FIT" not in r.stdout and "pp rank 1" in r.stdout
    r = run_cli("plan", "--prior", "12B", "--topology", "pp=2,replicate=64,shard=8", "--nodes", "100", "--dry-run")
    assert r.returncode == 2 and "= 1024 processes, but 800 were started" in r.stderr
    r = run_cli("plan", "--prior", "12B", "--topology", "pp=2,replicate=64,shard=8")
    assert r.returncode == 2 and "add --dry-run" in r.stderr
