"""The data-parallel dVAE under torchrun: exact resume, and a checkpoint the single-process tools read."""

import json
import subprocess
import sys

import torch
from _torchrun import ROOT, env, losses_by_step

from dalle_dist.files import load_checkpoint
from dalle_dist.models.loading import load_dvae

ARGS = ["launch/run.py", "--stage", "dvae", "--config", "configs/dvae/tiny.yaml", "--train.log_every", "1",
        "--train.progress", "false"]  # fmt: skip


def run(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *ARGS, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)


def test_dvae_data_parallel_resume_and_checkpoint(tmp_path):
    r = run(2, "--train.steps", "6", "--train.out_dir", str(tmp_path / "full"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert run(2, "--train.steps", "3", "--train.out_dir", str(tmp_path / "part")).returncode == 0
    r = run(2, "--train.steps", "6", "--train.out_dir", str(tmp_path / "part"))
    assert r.returncode == 0, r.stderr[-4000:]
    full = losses_by_step(tmp_path / "full")
    assert sorted(full) == list(range(1, 7))
    assert losses_by_step(tmp_path / "part") == full  # bit-exact: weights, Adam, EMA, per-(rank, step) noise

    model = load_dvae(str(tmp_path / "full" / "checkpoint.pt"))
    codes = model.encode_codes(torch.rand(2, 3, 64, 64))
    assert codes.shape == (2, 8, 8)
    row = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"nll", "kl", "recon_mse", "temperature", "kl_weight"} <= set(row)


def test_dvae_batch_must_split_over_ranks(tmp_path):
    r = run(2, "--data.batch_size", "3", "--train.steps", "1", "--train.out_dir", str(tmp_path))
    assert r.returncode != 0 and "must divide evenly over 2 processes" in r.stderr


def test_dvae_data_parallel_on_shards_resumes_exactly(tmp_path):
    from dalle_dist.data.shapes import write_shapes

    write_shapes(tmp_path / "data", n=64, shard_size=16, size=64, seed=0)
    shards = str(tmp_path / "data" / "train-{000000..000003}.tar")
    data = ["--data.source", "shards", "--data.shards", shards, "--data.batch_size", "4", "--data.shuffle_buffer", "4"]
    args = [*data, "--train.save_every", "3"]
    r = run(2, *args, "--train.steps", "6", "--train.out_dir", str(tmp_path / "full"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert run(2, *args, "--train.steps", "3", "--train.out_dir", str(tmp_path / "part")).returncode == 0
    cursors = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["data"]  # every rank's cursor, in one file
    assert cursors["world"] == 2 and len(cursors["cursors"]) == 2
    r = run(2, *args, "--train.steps", "6", "--train.out_dir", str(tmp_path / "part"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert losses_by_step(tmp_path / "part") == losses_by_step(tmp_path / "full")
