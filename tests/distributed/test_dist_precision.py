"""16-bit numerics in the distributed prior engine under real torchrun + gloo [P §2.4, App. D, E.2].

- bf16 on pp=2 × shard=2 trains and stays close to the fp32 one-process run;
- activation checkpointing changes no loss (fp32 on pp=2; bf16 on pp=2 × shard=2, where FSDP's 16-bit Linear
  units sit inside the recomputed region);
- fp16 with per-resblock scales on replicate=2 × shard=2 matches the one-process fp16 trainer and logs the scales;
- a nonfinite gradient planted on one rank (DALLE_DIST_FAULT_NONFINITE_GRAD) skips the update on every rank and
  divides only that resblock's scale; planted on another rank, or resumed mid-run, the run is bit-identical;
- the storage layout, checked inside two ranks: fp32 shards holding 16-bit values, 16-bit all-gathered weights,
  bf16 Adam moments for the 16-bit weights with precision.moments_dtype=bf16, kept across a save and a load.
"""

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from _spawn import run_distributed
from _torchrun import ROOT, TINY, env, torchrun_cmd

from dalle_dist.config import build_config
from dalle_dist.train.export import read_prior_weights
from dalle_dist.train.stages import PriorTrainer

KEYS = [str(k) for k in range(8)]  # the tiny prior's resblocks: 4 layers × (attention, MLP)
BF16 = ["--parallel.topology", "pp=2,shard=2", "--precision.dtype", "bf16"]
FP16 = ["--parallel.topology", "replicate=2,shard=2", "--precision.dtype", "fp16"]


def run(nproc: int, out: Path, steps: int, *extra: str, fault: str = "") -> list[dict]:
    """torchrun → the logged metrics by step. Ranks that disagree on a skip would deadlock in their next
    collective, so a timeout kills torchrun and every rank (its process group) and fails."""
    cmd = torchrun_cmd(nproc, *TINY, "--train.steps", str(steps), "--train.log_every", "1",
                       "--train.out_dir", str(out), *extra)  # fmt: skip
    e = env() | ({"DALLE_DIST_FAULT_NONFINITE_GRAD": fault} if fault else {})
    proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun {' '.join(extra)} (fault {fault!r}) hung: ranks out of step?")
    assert proc.returncode == 0, stderr[-4000:]
    rows: dict[int, dict] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[int(row["step"])] = row  # a resumed run re-logs; the last entry wins
    return [rows[s] for s in sorted(rows)]


def losses(rows: list[dict]) -> list[float]:
    return [r["loss"] for r in rows]


def single_process(dtype: str, steps: int, out: Path, **extra: str) -> list[float]:
    over = {"train.progress": "false", "train.out_dir": str(out), "precision.dtype": dtype, **extra}
    trainer = PriorTrainer(build_config("prior", ["configs/prior/tiny.yaml"], over)).build()
    return [trainer.step()["loss"] for _ in range(steps)]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory) -> list[dict]:
    return run(4, tmp_path_factory.mktemp("bf16"), 6, *BF16)


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory) -> list[dict]:
    return run(4, tmp_path_factory.mktemp("fp16"), 4, *FP16)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> list[dict]:
    return run(4, tmp_path_factory.mktemp("planted"), 4, *FP16, fault="1:2:3")


def test_bf16_pp2_shard2_trains_close_to_fp32(bf16_run, tmp_path):
    ref = single_process("fp32", len(bf16_run), tmp_path)
    got = losses(bf16_run)
    assert all(math.isfinite(x) for x in got) and not any(r["skipped"] for r in bf16_run)
    for a, b in zip(got, ref):
        assert abs(a - b) <= 2e-2 * abs(b), (a, b)
    assert got != ref  # not vacuous: the 16-bit path ran (bf16 rounding shows in the losses)
    assert got[-1] <= got[0] + 1e-2  # falling or close (random tokens: the loss sits near log 512)


def test_bf16_master_weights_on_replicas_follows_one_process(tmp_path):
    """precision.master_weights (the demo prior's setting): the engine's fp32 weights are never rounded to bf16, only
    the resblocks compute in bf16; on replicate=2 the run follows the one-process bf16 trainer with its fp32 master
    copy (whose gradients are bf16, hence a tolerance)."""
    args = ["--parallel.topology", "replicate=2", "--precision.dtype", "bf16", "--precision.master_weights", "true"]
    rows = run(2, tmp_path / "mw", 6, *args)
    ref = single_process("bf16", len(rows), tmp_path / "ref", **{"precision.master_weights": "true"})
    got = losses(rows)
    assert all(math.isfinite(x) for x in got) and not any(r["skipped"] for r in rows)
    for a, b in zip(got, ref):
        assert abs(a - b) <= 1e-2 * abs(b), (a, b)
    weights, _ = read_prior_weights(tmp_path / "mw", use_ema=False)
    w = weights["resblocks.0.attn.q_proj.weight"]
    assert w.dtype == torch.float32 and not torch.equal(w, w.bfloat16().float())  # off the bf16 grid: not rounded


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_checkpointing_changes_no_loss(precision, bf16_run, tmp_path):
    if precision == "fp32":  # pp=2, 2 processes
        args = ["--parallel.topology", "pp=2"]
        plain = losses(run(2, tmp_path / "plain", 4, *args))
    else:  # pp=2 × shard=2: the recomputation re-gathers FSDP's 16-bit Linear units
        args, plain = BF16, losses(bf16_run)
    ckpt = losses(run(2 if precision == "fp32" else 4, tmp_path / "ac", len(plain), *args,
                      "--precision.activation_checkpointing", "true"))  # fmt: skip
    assert ckpt == pytest.approx(plain, rel=1e-6, abs=0)


def test_fp16_per_resblock_scales_on_replicas_and_shards(fp16_run, tmp_path):
    ref = single_process("fp16", len(fp16_run), tmp_path)
    assert losses(fp16_run)[0] == pytest.approx(ref[0], rel=1e-5)
    assert losses(fp16_run) == pytest.approx(ref, rel=1e-4)
    for step, row in enumerate(fp16_run, start=1):
        assert row["skipped"] == 0.0 and math.isfinite(row["grad_norm"])
        # M = 1 (the engine's loss already carries dp_size): every scale starts at 2^13, grows 2^(1/1000) per step.
        for k in KEYS:
            assert row[f"gradscale/{k}/log2"] == pytest.approx(13 + step / 1000, abs=1e-9)
            assert row[f"gradscale/{k}/skips"] == 0.0 and row[f"gradscale/{k}/grad_norm"] > 0
        assert row["gradscale/updates"] == step
    norms = [fp16_run[-1][f"gradscale/{k}/grad_norm"] for k in [*KEYS, "rest"]]
    assert math.sqrt(sum(n * n for n in norms)) == pytest.approx(fp16_run[-1]["grad_norm"], rel=1e-9)


def test_planted_nonfinite_gradient_skips_every_rank(planted, fp16_run):
    # Rank 1 (replica 0, shard 1) sees an inf in resblock 3 at update 2. Every rank skips update 2 …
    assert [r["skipped"] for r in planted] == [0.0, 1.0, 0.0, 0.0]
    assert [r["gradscale/skips"] for r in planted] == [0, 1, 1, 1]
    assert losses(planted)[:2] == losses(fp16_run)[:2]  # the forward of update 2 was unaffected
    assert losses(planted)[2] != losses(fp16_run)[2]  # the skipped update shows from update 3 on
    assert all(math.isfinite(x) for x in losses(planted))
    # … and only resblock 3's scale is divided, by √2 (the others grow as usual) [P D.1].
    row = planted[1]
    assert row["gradscale/3/log2"] == pytest.approx(13 + 0.001 - 0.5, abs=1e-9)
    assert row["gradscale/3/skips"] == 1.0
    assert all(row[f"gradscale/{k}/log2"] == pytest.approx(13.002, abs=1e-9) for k in KEYS if k != "3")
    # The filter zeroed the inf at resblock 3's input, so no other resblock saw a nonfinite gradient.
    assert all(row[f"gradscale/{k}/skips"] == 0.0 for k in KEYS if k != "3")
    assert row["gradscale/3/filtered"] > 0 and not math.isfinite(row["grad_norm"])
    assert not math.isfinite(row["gradscale/3/grad_norm"])
    assert all(math.isfinite(row[f"gradscale/{k}/grad_norm"]) for k in [*KEYS, "rest"] if k != "3")


def test_planted_on_another_rank_and_resumed_is_identical(planted, tmp_path):
    # Rank 2 is replica 1, shard 0: if any rank had applied update 2 alone, its shard would differ from the run
    # above. The run stops after update 3 and resumes (scales, skip counts and backoff window from trainer.pt).
    out = tmp_path / "other"
    run(4, out, 3, *FP16, "--train.save_every", "3", fault="2:2:3")
    state = torch.load(out / "checkpoints" / "step_00000003" / "trainer.pt", weights_only=True)
    scaler = state["precision"]["grad_scaler"]
    assert scaler["updates"] == 3 and scaler["skips"] == 1 and scaler["last_backoff"][3] == 2
    resumed = run(4, out, 4, *FP16)
    keys = ["loss", "skipped", *(f"gradscale/{k}/log2" for k in KEYS)]
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in planted]


# ---- the layout inside the ranks --------------------------------------------------------------------


def layout_worker(rank: int, world: int, out: str) -> dict:
    from dalle_dist.train.prior import _local

    over = {"parallel.topology": "shard=2", "precision.dtype": "fp16", "precision.moments_dtype": "bf16",
            "train.out_dir": out, "train.progress": "false"}  # fmt: skip
    cfg = build_config("prior", ["configs/prior/tiny.yaml"], over)
    trainer = PriorTrainer(cfg).build()
    seen: dict[str, torch.dtype] = {}
    block = trainer.view.resblocks["1"]  # an MLP resblock

    def record(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            seen.setdefault(f"{name}.weight", module.weight.dtype)  # the unsharded (all-gathered) parameter

        return hook

    block.fc1.register_forward_pre_hook(record("fc1"))
    block.ln.register_forward_pre_hook(record("ln"))
    metrics = trainer.step()
    local = {n: _local(p) for n, p in trainer.named.items()}
    grads = {n: _local(p.grad) for n, p in trainer.named.items() if p.grad is not None}
    state = trainer.optimizer.state
    names = ("resblocks.1.fc1.weight", "resblocks.1.ln.weight")
    moments = {n: state[trainer.named[n]]["exp_avg_sq"].dtype for n in names}
    # bf16 moments survive a save and a load (AdamW32 would otherwise pick them by the fp32 storage dtype).
    saved = {n: _local(state[p]["exp_avg_sq"]).clone() for n, p in trainer.named.items()}
    path = trainer.save()
    again = PriorTrainer(cfg).build()
    again.load(path)
    loaded = {n: _local(again.optimizer.state[again.named[n]]["exp_avg_sq"]) for n in saved}
    reloaded = all(loaded[n].dtype == v.dtype and torch.equal(loaded[n], v) for n, v in saved.items())
    return {
        "moments": moments,
        "reloaded": reloaded,
        "gathered": seen,
        "storage": {t.dtype for t in local.values()},
        "grads": {g.dtype for g in grads.values()},
        "on_grid": all(torch.equal(local[n], local[n].half().float()) for n in trainer.parts.policy.low_params),
        "n_low": len(trainer.parts.policy.low_params),
        "ln_off_grid": not torch.equal(local["resblocks.1.ln.weight"], local["resblocks.1.ln.weight"].half().float()),
        "skipped": metrics["skipped"],
    }


def test_layout_fp32_shards_16bit_gather_bf16_moments(tmp_path):
    for r in run_distributed(layout_worker, 2, str(tmp_path), timeout=60):
        assert r["gathered"] == {"fc1.weight": torch.float16, "ln.weight": torch.float32}
        assert r["storage"] == {torch.float32} and r["grads"] == {torch.float32}
        assert r["on_grid"] and r["n_low"] == 4 * (4 + 2) and r["skipped"] == 0.0  # q, k, v, out; fc1, fc2
        assert r["ln_off_grid"]  # gains and biases keep fp32 values [P D.2]
        # precision.moments_dtype=bf16: bf16 moments for the 16-bit weights only [P B.2, D.2], exact on resume.
        assert r["moments"] == {"resblocks.1.fc1.weight": torch.bfloat16, "resblocks.1.ln.weight": torch.float32}
        assert r["reloaded"]
