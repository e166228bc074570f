"""Planner numbers against the paper, and the CLI as a user runs it."""

import json
import subprocess
import sys

import pytest

from dalle_dist.plan import plan


def test_12b_plan_matches_paper():
    p = plan(prior="12B", dvae="openai")
    prior, dvae = p["prior"], p["dvae"]
    assert prior["params_effective"] == 12 * 64 * 3968**2
    assert abs(prior["params_effective"] - 12.0e9) / 12.0e9 < 0.01  # [P Table 1]
    assert prior["n_resblocks"] == 128  # [P D.1]
    assert prior["params_total"] > prior["params_effective"]
    assert 23e9 < prior["weights_bytes"]["fp16"] < 25e9  # "about 24 GB" [P §2.5]
    assert prior["weights_bytes"]["fp32"] == 2 * prior["weights_bytes"]["fp16"]
    assert dvae["encoder_params"] == 53_786_240 and dvae["decoder_params"] == 43_829_766  # [C]


@pytest.mark.parametrize("flavor,target", [("2.8B", 2.8e9), ("5.6B", 5.6e9), ("12B", 12.0e9)])
def test_table1_sizes(flavor, target):
    eff = plan(prior=flavor)["prior"]["params_effective"]
    assert abs(eff - target) / target < 0.02


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dalle_dist", *args], capture_output=True, text=True, timeout=120)


def test_cli_plan_json():
    r = run_cli("plan", "--prior", "12B", "--dvae", "openai", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prior"]["params_effective"] == 12 * 64 * 3968**2
    assert out["dvae"]["decoder_params"] == 43_829_766


def test_cli_help_and_config_errors():
    r = run_cli("--help")
    assert r.returncode == 0 and "train-prior" in r.stdout and "plan" in r.stdout
    r = run_cli("train-prior", "--optim.lrr", "3e-4")
    assert r.returncode == 2 and "did you mean 'optim.lr'" in r.stderr
    r = run_cli("config", "--stage", "prior", "--flavor", "12B", "--optim.lr", "1e-4")
    assert r.returncode == 0 and "d_model: 3968" in r.stdout and "lr: 0.0001" in r.stdout


def test_cli_trains_and_resumes(tmp_path):
    args = ["train-prior", "--config", "configs/prior/tiny.yaml", "--train.out_dir", str(tmp_path)]
    r = run_cli(*args, "--train.steps", "2", "--train.progress", "false")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["steps"] == 2
    r = run_cli(*args, "--train.steps", "3", "--train.progress", "false")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["steps"] == 3
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 1


PAPER_RUN = ("--topology", "pp=1,replicate=128,shard=8", "--gpu", "v100-16gb", "--dry-run", "--json")


def test_cli_dry_run_of_a_run_config_plans_what_the_trainer_builds():
    """``--config`` resolves the YAML as the launcher does: configs/prior/dalle_12b.yaml is the paper's run (12B,
    global batch 1024, fp16, activation checkpointing, PowerSGD rank 896 on pp=1,replicate=128,shard=8), so every
    per-rank figure equals ``--prior 12B --powersgd-rank 896`` with the dry run's paper defaults."""
    by_config = run_cli("plan", "--config", "configs/prior/dalle_12b.yaml", "--gpu", "v100-16gb", "--dry-run", "--json")
    by_flavor = run_cli("plan", "--prior", "12B", *PAPER_RUN, "--powersgd-rank", "896")
    assert by_config.returncode == 0 and by_flavor.returncode == 0, by_config.stderr + by_flavor.stderr
    a, b = json.loads(by_config.stdout), json.loads(by_flavor.stdout)
    assert a["run_config"]["train"]["out_dir"] == "runs/prior_12b"  # the YAML was read
    for key in ("flavor", "topology", "batch", "per_rank_memory_bytes", "bytes_per_step", "ranks"):
        assert a[key] == b[key], key
    assert a["params_total"] == b["params_total"] == 12_292_840_960
    # A run the trainer would refuse is refused by the plan, with the trainer's message.
    refused = run_cli("plan", "--config", "configs/prior/dalle_12b.yaml", *PAPER_RUN, "--data.batch_size", "1")
    assert refused.returncode == 2 and refused.stdout == ""
    assert (
        "data.batch_size=1 is the global batch and must divide evenly over replicate × shard = 1024 data-parallel "
        "ranks; e.g. --data.batch_size 1024" in refused.stderr
    )


def test_cli_plan_options_need_dry_run():
    r = run_cli("plan", "--config", "configs/prior/dalle_12b.yaml")
    assert r.returncode == 2 and "--config is an option of the simulation: add --dry-run" in r.stderr
    r = run_cli("plan", "--prior", "12B", "--data.batch_size", "8")
    assert r.returncode == 2 and "go with --dry-run" in r.stderr
    r = run_cli("plan", "--dry-run")
    assert r.returncode == 2 and "pass --prior FLAVOR or --config YAML" in r.stderr
