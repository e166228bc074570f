"""``dalle-dist plan --dry-run``: real stages on the meta device under a fake process group, and the arithmetic."""

import json
import math
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import dalle_dist.parallel.parallelize as parallelize
from dalle_dist.config import ConfigError, build_config
from dalle_dist.parallel.pipeline import bubble_fraction
from dalle_dist.parallel.topology import Topology
from dalle_dist.plan_dry_run import (
    FP32,
    GIB,
    DryRunOptions,
    dry_run,
    fake_process_group,
    format_dry_run,
    in_flight,
    in_flight_per_stage,
    prior_run_config,
    shard_sizes,
    shard_stages,
    usable_bytes,
)
from dalle_dist.train.prior_checks import check_prior_config

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
    topo = Topology(pp=2, replicate=1, shard=3)  # 3 does not divide 64: FSDP2 pads, the last shard is smaller
    opts = DryRunOptions(topology=topo.describe(), flavor="tiny", global_batch=12)
    cfg = prior_run_config(opts)
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
    # The engine cuts fc2 (d, 4d) along 4d as the paper does (parallel.fc2_shard_dim 1): the rate is 1 − 5r/(8d) …
    assert pp2["compression_rate"] == pytest.approx(1 - 5 * 112 * 8 / (8 * 3968), rel=1e-9)
    along_d = dry_run(DryRunOptions(topology="pp=2,replicate=64,shard=8", fc2_shard_dim=0, **common))
    # … and FSDP2's default dim 0 along d: P of its shard is (d/8 + 4d)·r, 1 − 27r/(4d) per GPU rank r.
    assert along_d["compression_rate"] == pytest.approx(1 - 27 * 112 / (4 * 3968), rel=1e-9)
    pp16 = dry_run(DryRunOptions(topology="pp=16,replicate=8,shard=8", **common))
    assert pp16["fits"] and pp16["per_rank_memory_bytes"]["total"] < 12 * GIB
    assert not dry_run(DryRunOptions(topology="pp=1,replicate=1024,shard=1", **common))["fits"]
    paper_layout = dry_run(DryRunOptions(topology="pp=1,replicate=128,shard=8", **common))
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


def test_stages_are_built_by_the_trainers_functions(monkeypatch):
    """The planner's shards come from build_prior_parts + apply_prior_fsdp, not from a copy of them."""
    calls = []
    real_apply_fsdp = parallelize.apply_fsdp

    def spy(stages, *args, **kwargs):
        calls.append([s.keys for s in stages])
        return real_apply_fsdp(stages, *args, **kwargs)

    monkeypatch.setattr(parallelize, "apply_fsdp", spy)
    opts = DryRunOptions(topology="pp=2,replicate=1,shard=2", virtual_stages=2, **TINY)
    cfg = prior_run_config(opts)
    topo = check_prior_config(cfg)
    r = dry_run(opts, cfg)
    assert len(calls) == topo.pp  # once per pp rank, with that rank's two virtual stages
    for pp_rank, rank in enumerate(r["ranks"]):
        with fake_process_group(0, 1), torch.random.fork_rng(devices=[]):
            parts = parallelize.build_prior_parts(cfg, topo, pp_rank, torch.device("meta"))
        measured = [p.name for s in shard_stages(cfg, topo, pp_rank, opts) for p in s.params]
        assert measured == [n for s in parts.stages for n, _ in s.named_parameters()]
        assert sorted(measured) == sorted(n for n, _ in parts.view.named_parameters())
        assert rank["stages"] == parts.pipeline.stage_ids
    assert not dist.is_initialized()


def test_run_config_settings_and_the_trainers_messages():
    cfg = build_config(
        "prior",
        ["configs/prior/tiny.yaml"],
        {"parallel.topology": "pp=1,replicate=2,shard=2", "data.batch_size": 8, "precision.dtype": "bf16"},
    )
    r = dry_run(DryRunOptions(gpu="h100-80gb"), cfg)  # the options' flavor, topology, batch ... are not read
    assert r["flavor"] == "tiny" and r["topology"]["world_size"] == 4 and r["batch"]["global"] == 8
    assert r["settings"]["precision"] == "bf16" and r["run_config"]["precision"]["dtype"] == "bf16"
    assert r["settings"]["activation_checkpointing"] is cfg.precision.activation_checkpointing
    cfg.data.batch_size = 6  # does not divide over 4 data-parallel ranks
    with pytest.raises(ConfigError) as trainer:
        check_prior_config(cfg, 4)
    with pytest.raises(ConfigError) as planner:
        dry_run(DryRunOptions(), cfg)
    assert str(planner.value) == str(trainer.value) and "data.batch_size=6 is the global batch" in str(trainer.value)


def test_modelled_options_are_named_and_the_optimizer_is_the_engines():
    base = DryRunOptions(topology="pp=1,replicate=2,shard=1", flavor="tiny", global_batch=8)
    built = dry_run(base)
    assert built["settings"]["modelled"] == [] and not any("modelled" in n for n in built["notes"])
    what_if = dry_run(DryRunOptions(**{**base.__dict__, "storage": "policy", "ema_on_device": False}))
    assert what_if["settings"]["modelled"] == ["--storage policy", "--ema-on-cpu"]
    assert any(n.startswith("modelled, not built: --storage policy, --ema-on-cpu") for n in what_if["notes"])
    # fp16 without master weights: the trainer builds ShardedAdamW32, which loops (no foreach copy at shard = 1);
    # with bf16 moments (the default) it also holds fp32 copies of one parameter's two moments.
    m = built["per_rank_memory_bytes"]
    cfg = prior_run_config(base)
    biggest = max(p.local_numel for s in shard_stages(cfg, check_prior_config(cfg), 0, base) for p in s.params)
    assert built["settings"]["optimizer"] == "ShardedAdamW32" and m["optimizer_workspace"] == 4 * FP32 * biggest
    fp32 = dry_run(DryRunOptions(**{**base.__dict__, "moments": "fp32"}))["per_rank_memory_bytes"]
    assert m["optimizer"] < fp32["optimizer"] and m["optimizer_workspace"] == 2 * fp32["optimizer_workspace"]
    assert in_flight(0, 4, 8, 1, "gpipe") == 8 and in_flight(0, 4, 8, 1) == 4
