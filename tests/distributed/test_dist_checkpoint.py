"""Distributed checkpoints: exact resume after a real SIGKILL, resume on another topology, atomic saves."""

import os
import signal
import subprocess
import time

import pytest
import torch
from _torchrun import ROOT, TINY, env, losses_by_step, torchrun, torchrun_cmd

from dalle_dist.train.dist_checkpoint import latest_checkpoint, list_checkpoints
from dalle_dist.train.export import read_prior_weights

STEPS = 12
ARGS = [*TINY, "--train.steps", str(STEPS), "--train.log_every", "1", "--train.save_every", "3"]
PP2_SHARD2 = ["--parallel.topology", "pp=2,shard=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("full")
    r = torchrun(4, *ARGS, *PP2_SHARD2, "--train.out_dir", str(out))
    assert r.returncode == 0, r.stderr[-4000:]
    return losses_by_step(out)


def test_sigkill_mid_run_then_resume_is_exact(uninterrupted, tmp_path):
    proc = subprocess.Popen(
        torchrun_cmd(4, *ARGS, *PP2_SHARD2, "--train.out_dir", str(tmp_path)),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 180
    try:
        while time.time() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank, no chance to clean up
    finally:
        proc.wait(timeout=60)
    killed_at = max(losses_by_step(tmp_path))
    assert 6 <= killed_at < STEPS
    resumed_from = latest_checkpoint(tmp_path)
    assert resumed_from is not None and int(resumed_from.name.split("_")[1]) <= killed_at

    r = torchrun(4, *ARGS, *PP2_SHARD2, "--train.out_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-4000:]
    resumed = losses_by_step(tmp_path)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == uninterrupted  # bit-exact on CPU, every step


def test_resume_across_topologies(uninterrupted, tmp_path):
    # Saved on pp=2 × shard=2 at step 6, continued on one process.
    a = tmp_path / "a"
    half = [*TINY, "--train.log_every", "1", "--train.steps", "6"]
    assert torchrun(4, *half, *PP2_SHARD2, "--train.out_dir", str(a)).returncode == 0
    r = torchrun(1, *ARGS, "--parallel.topology", "pp=1", "--train.out_dir", str(a))
    assert r.returncode == 0, r.stderr[-4000:]
    got = losses_by_step(a)
    for step in range(7, STEPS + 1):
        assert got[step] == pytest.approx(uninterrupted[step], rel=1e-5), step

    # And the reverse: saved on one process, continued on pp=2 × shard=2.
    b = tmp_path / "b"
    assert torchrun(1, *half, "--train.out_dir", str(b)).returncode == 0
    r = torchrun(4, *ARGS, *PP2_SHARD2, "--train.out_dir", str(b))
    assert r.returncode == 0, r.stderr[-4000:]
    got = losses_by_step(b)
    for step in range(7, STEPS + 1):
        assert got[step] == pytest.approx(uninterrupted[step], rel=1e-5), step

    # Export reads a distributed checkpoint of any topology in one process, without a process group: the weights
    # saved at step 6 on pp=2 × shard=2 equal those saved at step 6 on one process.
    wa, _ = read_prior_weights(a / "checkpoints" / "step_00000006", use_ema=False)
    wb, _ = read_prior_weights(b / "checkpoints" / "step_00000006", use_ema=False)
    assert wa.keys() == wb.keys() and len(wa) > 10
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    ea, _ = read_prior_weights(a / "checkpoints" / "step_00000006", use_ema=True)
    assert any(not torch.equal(ea[k], wa[k]) for k in wa)


def test_interrupted_save_is_ignored_and_old_ones_pruned(tmp_path):
    r = torchrun(2, *ARGS, "--parallel.topology", "shard=2", "--train.keep_checkpoints", "2",
                 "--train.out_dir", str(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    kept = [p.name for p in list_checkpoints(tmp_path)]
    assert kept == ["step_00000009", "step_00000012"]
    # A save that died half-way: a .tmp directory, and a step directory without its trainer.pt marker.
    root = tmp_path / "checkpoints"
    (root / "step_00000015.tmp").mkdir()
    (root / "step_00000015.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (root / "step_00000018").mkdir()
    assert latest_checkpoint(tmp_path) == root / "step_00000012"
    r = torchrun(2, *ARGS, "--parallel.topology", "shard=2", "--train.steps", "13", "--train.out_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-4000:]
    assert latest_checkpoint(tmp_path) == root / "step_00000013"
    assert not (root / "step_00000015.tmp").exists()
