"""One engine from one process to many: ``dalle-dist train-prior`` (the 1-rank job) and torchrun on
replicate=2, shard=2 and pp=2 log the same losses, write the same checkpoint layout and export the same EMA weights,
in fp16 with per-resblock scales, through a step skipped by a planted Inf and an EMA averaged every 3 applied updates
[P D.1, B.2]. And the folder source, split over the data-parallel ranks under torchrun, follows one process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _torchrun import ROOT, TINY, env, losses_by_step, torchrun

from dalle_dist.train.export import read_prior_weights

STEPS = 7  # the skipped update 2 leaves 6 applied: the EMA averages after applied updates 3 and 6 (steps 4 and 7)
FP16 = ["--precision.dtype", "fp16", "--optim.ema_every", "3", "--train.log_every", "1", "--train.steps", str(STEPS)]
FAULT = "DALLE_DIST_FAULT_NONFINITE_GRAD"


def one_process(out: Path, *args: str, fault: str = "") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dalle_dist", "train-prior", *TINY, "--train.out_dir", str(out), *args]
    e = env() | ({FAULT: fault} if fault else {})
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    r = one_process(out, *FP16, fault="0:2:3")
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def layout(out: Path) -> set[str]:
    """The checkpoint directory's rank-independent files (each rank adds its rng_R.pt and DCP data file)."""
    step = out / "checkpoints" / f"step_{STEPS:08d}"
    return {p.name for p in step.iterdir() if not p.name.startswith(("rng_", "__"))}


@pytest.mark.parametrize(
    ("topology", "fault"),
    [("replicate=2", "1:2:3"), ("shard=2", "1:2:3"), ("pp=2", "0:2:3")],  # a rank that holds resblock 3
)
def test_fp16_one_process_and_torchrun_agree(reference, tmp_path, topology, fault, monkeypatch):
    monkeypatch.setenv(FAULT, fault)
    r = torchrun(2, *TINY, *FP16, "--parallel.topology", topology, "--train.out_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-4000:]
    ref, got = losses_by_step(reference), losses_by_step(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([ref[s] for s in sorted(ref)], rel=1e-4)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # the planted Inf, on every rank
    assert layout(tmp_path) == layout(reference) == {"trainer.pt", ".metadata"}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"step_{STEPS:08d}"]
    states = [torch.load(o / "checkpoints" / f"step_{STEPS:08d}" / "trainer.pt", weights_only=True)
              for o in (reference, tmp_path)]  # fmt: skip
    assert states[0]["ema_calls"] == states[1]["ema_calls"] == 6  # applied updates, not steps
    assert states[0]["precision"] == states[1]["precision"]  # the same scales, skips and backoff window
    ema_ref, _ = read_prior_weights(reference, use_ema=True)
    ema, _ = read_prior_weights(tmp_path, use_ema=True)
    raw, _ = read_prior_weights(tmp_path, use_ema=False)
    for k, v in ema_ref.items():
        torch.testing.assert_close(ema[k], v, rtol=1e-3, atol=1e-5, msg=k)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # the EMA is not the weights


def make_folder(root: Path, n: int = 6) -> Path:
    """n pairs: a coloured square on grey and its caption."""
    from PIL import Image

    root.mkdir(parents=True)
    for i in range(n):
        arr = torch.full((72, 72, 3), 128, dtype=torch.uint8)
        arr[8 + 4 * i : 40 + 4 * i, 16:48] = torch.tensor([40 * i, 200 - 30 * i, 90], dtype=torch.uint8)
        Image.fromarray(arr.numpy()).save(root / f"{i:04d}.png")
        (root / f"{i:04d}.txt").write_text(f"square number {i}")
    return root


def test_folder_source_is_split_over_data_parallel_ranks(tmp_path):
    """data.source=folder under torchrun: every rank encodes the folder, takes its slice of the global batch."""
    folder = make_folder(tmp_path / "pairs")
    dvae = tmp_path / "dvae"
    r = subprocess.run([sys.executable, "-m", "dalle_dist", "train-dvae", "--config", "configs/dvae/tiny.yaml",
                        "--data.source", "folder", "--data.path", str(folder), "--data.batch_size", "4",
                        "--train.steps", "2", "--train.progress", "false", "--train.out_dir", str(dvae)],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    dvae = dvae / "checkpoint.pt"
    data = ["--data.source", "folder", "--data.path", str(folder), "--data.dvae_checkpoint", str(dvae),
            "--data.batch_size", "4", "--train.steps", "4", "--train.log_every", "1"]  # fmt: skip
    r = one_process(tmp_path / "one", *data)
    assert r.returncode == 0, r.stderr[-4000:]
    r = torchrun(2, *TINY, *data, "--parallel.topology", "replicate=2", "--train.out_dir", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-4000:]
    one, two = losses_by_step(tmp_path / "one"), losses_by_step(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4]
    assert [two[s] for s in sorted(two)] == pytest.approx([one[s] for s in sorted(one)], rel=1e-5)
