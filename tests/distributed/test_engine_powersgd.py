"""PowerSGD on the engine's replicate dim: exact at full rank, compressing at low rank, exact resume of the
error buffers (the checkpoint stores their sum over replicas [P E.2 notes])."""

import pytest
from _torchrun import TINY, losses_by_step, torchrun

from dalle_dist.config import build_config
from dalle_dist.train.stages import PriorTrainer

PSGD = ["--comm.replica_reduce", "powersgd", "--train.log_every", "1"]
TOPO = ["--parallel.topology", "replicate=2,shard=2"]


def test_full_rank_powersgd_equals_one_process(tmp_path):
    over = {"train.steps": "4", "train.progress": "false", "train.out_dir": str(tmp_path / "single")}
    ref = [h["loss"] for h in PriorTrainer(build_config("prior", ["configs/prior/tiny.yaml"], over)).fit()]
    full_rank = ["--comm.powersgd_rank", "64", "--comm.powersgd_min_compression_rate", "0"]
    r = torchrun(4, *TINY, *PSGD, *TOPO, *full_rank, "--train.steps", "4", "--train.out_dir", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr[-4000:]
    got = losses_by_step(tmp_path / "d")
    assert [got[s] for s in range(1, 5)] == pytest.approx(ref, rel=1e-5)


def test_low_rank_compresses_and_resumes_exactly(tmp_path):
    args = [*TINY, *PSGD, *TOPO, "--comm.powersgd_rank", "4", "--train.save_every", "3"]
    r = torchrun(4, *args, "--train.steps", "6", "--train.out_dir", str(tmp_path / "full"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert torchrun(4, *args, "--train.steps", "3", "--train.out_dir", str(tmp_path / "part")).returncode == 0
    assert (tmp_path / "part" / "checkpoints" / "step_00000003" / "powersgd_pp0of1_shard1of2.pt").is_file()
    r = torchrun(4, *args, "--train.steps", "6", "--train.out_dir", str(tmp_path / "part"))
    assert r.returncode == 0, r.stderr[-4000:]
    # The checkpoint keeps only Σ_i E_i and every replica resumes with the mean [P E.2 notes]: the same sum, so
    # the same updates, up to the float rounding of re-splitting it (bit-exact resume is the all-reduce path's).
    resumed, full = losses_by_step(tmp_path / "part"), losses_by_step(tmp_path / "full")
    assert sorted(resumed) == sorted(full)
    for step in full:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6), step

    import json

    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["comm_bytes"] < 0.6 * r["comm_bytes_uncompressed"] for r in rows)
