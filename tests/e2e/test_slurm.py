"""A real one-node SLURM cluster (munge + slurmctld + slurmd) runs `sbatch launch/train_prior.slurm` to completion.

CI installs Debian's slurm-wlm (launch/local/install_system_deps.sh, run by `make test` as root).
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    shutil.which("slurmctld") is None or os.geteuid() != 0,
    reason="needs root and Debian's slurm-wlm (launch/local/install_system_deps.sh installs it)",
)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    r = subprocess.run(["bash", "launch/local/slurm_cluster.sh", "start", str(state)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    subprocess.run(["bash", "launch/local/slurm_cluster.sh", "stop", str(state)], cwd=ROOT, timeout=60)


def sbatch(env: dict, out: Path, steps: int, log: Path) -> subprocess.CompletedProcess:
    args = ["--config", "configs/prior/tiny.yaml", "--parallel.topology", "shard=2", "--train.steps", str(steps),
            "--train.log_every", "1", "--train.save_every", "2", "--train.progress", "false",
            "--train.out_dir", str(out)]  # fmt: skip
    cmd = ["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", f"--output={log}",
           "--export=ALL,NPROC_PER_NODE=2", "launch/train_prior.slurm", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_sbatch_train_prior_then_requeued_job_resumes(slurm, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    r = sbatch(slurm, out, 4, log)
    assert r.returncode == 0, r.stdout + r.stderr + (log.read_text() if log.exists() else "")
    text = log.read_text()
    assert "1 node(s) × 2 process(es)" in text
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (out / "checkpoints" / "step_00000004" / "trainer.pt").is_file()

    # A requeued (or resubmitted) job with the same out_dir continues from the latest checkpoint.
    r = sbatch(slurm, out, 6, log)
    assert r.returncode == 0, r.stdout + r.stderr + log.read_text()
    assert "resumed from" in log.read_text() and "step_00000004" in log.read_text()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
