"""The package as a user gets it: a wheel, installed outside the checkout, run from another directory.

The wheel is built from a copy of the sources (so nothing is written into the checkout) and installed without
dependencies into a target directory; the commands run with ``PYTHONPATH`` on that directory (torch and the
other dependencies come from this interpreter's environment) and with a working directory that holds no
``configs/``, so ``--config configs/prior/tiny.yaml`` must be the wheel's package data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config", "configs/prior/tiny.yaml"]
QUIET = ["--train.log_every", "1", "--train.progress", "false", "--train.wandb", "disabled"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """(site directory with the installed wheel, an empty working directory, the environment to run in)."""
    tmp = tmp_path_factory.mktemp("installed")
    src = tmp / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("dalle_dist", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "wheel"), "."]
    subprocess.run(build, cwd=src, check=True, capture_output=True, timeout=120)
    (wheel,) = (tmp / "wheel").glob("dalle_dist-*.whl")
    site = tmp / "site"
    install = [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=120)
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return site, cwd, env


def run(installed: tuple[Path, Path, dict[str, str]], *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    _, cwd, env = installed
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_installed_package_is_imported_with_its_configs(installed) -> None:
    site, _, _ = installed
    probe = "import dalle_dist.config as c, dalle_dist.launch as l; print(c.__file__, l.__file__, c.shipped_configs())"
    r = run(installed, "-c", probe)
    assert r.returncode == 0, r.stderr
    paths = [Path(p) for p in r.stdout.split()]
    assert all(p.is_relative_to(site) for p in paths), (paths, site)  # the wheel's copy, not the checkout
    assert (paths[2] / "prior" / "tiny.yaml").is_file() and (paths[2] / "demo" / "prior.yaml").is_file()


def test_config_command_reads_the_packaged_yaml(installed) -> None:
    r = run(installed, "-m", "dalle_dist", "config", "--stage", "prior", *TINY, "--train.steps", "7")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["model"]["flavor"] == "tiny" and cfg["train"]["steps"] == 7
    r = run(installed, "-m", "dalle_dist", "config", "--stage", "prior", "--config", "configs/prior/nope.yaml")
    assert r.returncode == 2 and "configs/prior/nope.yaml" in r.stderr and "not found" in r.stderr
    r = run(installed, "-m", "dalle_dist.launch", "--config", "configs/prior/nope.yaml")  # before any process group
    assert r.returncode == 2 and "config error" in r.stderr and "configs/prior/nope.yaml" in r.stderr


def test_train_prior_runs_from_the_wheel(installed, tmp_path: Path) -> None:
    out = tmp_path / "prior"
    r = run(installed, "-m", "dalle_dist", "train-prior", *TINY, "--train.steps", "2", "--train.out_dir", str(out),
            *QUIET)  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["stage"] == "prior" and summary["steps"] == 2 and summary["out_dir"] == str(out)
    assert [m["step"] for m in metrics(out)] == [1, 2]


def test_torchrun_launches_the_packaged_module(installed, tmp_path: Path) -> None:
    out = tmp_path / "prior_dist"
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "dalle_dist.launch"]
    args = ["--stage", "prior", *TINY, "--train.steps", "2", "--train.out_dir", str(out), *QUIET]
    r = run(installed, *torchrun, *args, timeout=180)
    assert r.returncode == 0, r.stderr[-4000:]
    assert [m["step"] for m in metrics(out)] == [1, 2]
