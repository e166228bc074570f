"""``dalle-dist demo``: the whole DALL-E recipe on the built-in synthetic shapes set, on CPU, in minutes.

Every step runs the same command a user would type (``dalle-dist ...`` or ``torchrun -m dalle_dist.launch``) in a
subprocess, with its output in ``OUT/logs/NN_step.log``:

1. ``data shapes``       training shards + shards of held-out (colour, shape) pairs [P §3 zero-shot]
2. ``tokenizer train``   BPE on the training captions [P §2.2]
3. ``train-dvae``        stage 1 [P §2.1]
4. ``pretokenize``       images → dVAE argmax codes [P §2.2]
5. ``torchrun -m dalle_dist.launch``  stage 2 on 2 gloo processes [P §2.2, §2.5]
6. ``train-reranker``    the contrastive reranker [P §2.6]
7. ``export``            prior + dVAE + tokenizer + reranker in one directory
8. ``generate``          N samples per seen and per held-out caption, reranked to the best K [P §2.6]
9. ``eval --judge``      the judge's caption match, before and after reranking

then :mod:`dalle_dist.demo.report` writes ``OUT/report.md``, its figures and ``OUT/summary.json``. A step whose
output is complete is not run again, so an interrupted demo continues where it stopped (``--fresh`` restarts).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import build_config, shipped_configs
from ..data.shapes import heldout_pairs

# The directory this dalle_dist is imported from (a checkout, or site-packages): every step's subprocess imports
# the same copy. The launcher is a module of the package, the configs its package data (or the checkout's).
IMPORT_ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = "dalle_dist.launch"
CONFIGS = shipped_configs() / "demo"


@dataclass
class DemoSettings:
    """Sizes of the demo; the defaults fit in 15 minutes on 2 CPU cores (docs/demo.md has the measured times)."""

    out: str = "runs/demo"
    n_train: int = 6000  # training images (6 shards of 1000)
    n_heldout: int = 200  # images of held-out pairs (the dVAE's reconstruction test set)
    shard_size: int = 1000  # samples per shard; the prior's 2 processes need at least 2 token shards
    dvae_steps: int = 500
    prior_steps: int = 3800
    reranker_steps: int = 200
    topology: str = "replicate=2"  # 2 gloo processes: plain data parallel with an fp32 all-reduce
    n_samples: int = 64  # samples per caption [P §2.6 draws 512]; fewer make the figures noisy (±0.05 at 16)
    rerank_k: int = 16  # kept per caption [P §2.6 keeps 32 of 512 for humans, 1 for FID]
    seed: int = 0
    device: str = "cpu"
    inception: str = ""  # local Inception weights: also report FID / IS of the samples against held-out images
    quick: bool = False  # a few steps of everything: checks that the pipeline runs, not what it learns
    seen_captions: list[str] = field(default_factory=list)
    heldout_captions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.quick:
            self.n_train, self.n_heldout, self.shard_size = 400, 40, 100
            self.dvae_steps, self.prior_steps, self.reranker_steps = 4, 4, 4
            self.n_samples, self.rerank_k = 4, 2
        held = heldout_pairs(self.seed)
        if not self.heldout_captions:
            self.heldout_captions = [f"a {c} {s}" for c, s in held]
        if not self.seen_captions:
            seen = [("red", "circle"), ("blue", "square"), ("green", "cross"), ("yellow", "triangle")]
            seen += [("magenta", "diamond"), ("cyan", "square"), ("white", "circle"), ("red", "diamond")]
            self.seen_captions = [f"a {c} {s}" for c, s in seen if (c, s) not in held]
        if self.rerank_k > self.n_samples:
            raise ValueError(f"rerank_k={self.rerank_k} must be <= n_samples={self.n_samples}")


@dataclass
class Step:
    name: str
    cmd: list[str]
    done: Callable[[], bool]  # the step's output is complete (it is skipped on a rerun)
    env: dict[str, str] = field(default_factory=dict)


def _dalle(*args: str) -> list[str]:
    return [sys.executable, "-m", "dalle_dist.cli", *args]


def _exists(path: Path) -> Callable[[], bool]:
    return lambda: path.exists()


def build_steps(s: DemoSettings) -> list[Step]:
    out = Path(s.out)
    data, held = out / "data", out / "data" / "heldout"
    n_shards = (s.n_train + s.shard_size - 1) // s.shard_size
    train_shards = str(data / f"train-{{000000..{n_shards - 1:06d}}}.tar")
    tok, dvae, tokens = out / "tokenizer.json", out / "dvae", out / "tokens"
    prior, rerank, export = out / "prior", out / "reranker", out / "export"
    wandb = ["--train.wandb", "disabled"]
    # The demo's configs as the trainers will read them (flavor → YAML → the data paths below): the images are
    # drawn at the side the dVAE reads, and the prior's cosine must end after its warmup.
    dvae_cfg = build_config("dvae", [CONFIGS / "dvae.yaml"], {"data.shards": train_shards})
    prior_cfg = build_config(
        "prior", [CONFIGS / "prior.yaml"], {"data.shards": str(tokens), "data.tokenizer": str(tok)}
    )
    image_size, prior_warmup = dvae_cfg.model.image_size, prior_cfg.optim.warmup_steps
    dvae_precision = _precision_override("dVAE", dvae_cfg.precision.dtype, s.device)
    prior_precision = _precision_override("prior", prior_cfg.precision.dtype, s.device)
    steps = [
        Step(
            "data",
            _dalle(
                "data",
                "shapes",
                "--out",
                str(data),
                "--n",
                str(s.n_train),
                "--n-heldout",
                str(s.n_heldout),
                "--shard-size",
                str(s.shard_size),
                "--size",
                str(image_size),
                "--seed",
                str(s.seed),
            ),  # fmt: skip
            _exists(data / "manifest.json"),
        ),
        Step(
            "tokenizer",
            _dalle("tokenizer", "train", "--shards", train_shards, "--out", str(tok), "--vocab-size", "512"),
            _exists(tok),
        ),
        Step(
            "dvae",
            _dalle(
                "train-dvae",
                "--config",
                str(CONFIGS / "dvae.yaml"),
                "--data.shards",
                train_shards,
                "--train.steps",
                str(s.dvae_steps),
                # τ and lr follow the run's length, so --dvae-steps N still ends at τ = 1/16 [P A.2]
                "--optim.temp_steps",
                str(s.dvae_steps),
                "--optim.lr_steps",
                str(s.dvae_steps),
                "--train.out_dir",
                str(dvae),
                "--train.device",
                s.device,
                "--train.seed",
                str(s.seed),
                *dvae_precision,
                *wandb,
            ),  # fmt: skip
            lambda: _trained(dvae / "metrics.jsonl", s.dvae_steps),
        ),
        Step(
            "pretokenize",
            _dalle(
                "pretokenize",
                "--shards",
                train_shards,
                "--dvae",
                str(dvae / "checkpoint.pt"),
                "--out",
                str(tokens),
                "--procs",
                "2",
                "--shard-size",
                str(s.shard_size),
                "--device",
                s.device,
            ),  # fmt: skip
            _exists(tokens / "manifest.json"),
        ),
        Step(
            "prior",
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                LAUNCHER,
                "--stage",
                "prior",
                "--config",
                str(CONFIGS / "prior.yaml"),
                "--data.shards",
                str(tokens),
                "--data.tokenizer",
                str(tok),
                "--parallel.topology",
                s.topology,
                "--train.steps",
                str(s.prior_steps),
                "--optim.lr_steps",  # the cosine decay ends with the run (it must start after warmup)
                str(max(s.prior_steps, prior_warmup + 1)),
                "--train.out_dir",
                str(prior),
                "--train.device",
                s.device,
                "--train.seed",
                str(s.seed),
                "--train.progress",
                "false",
                *prior_precision,
                *wandb,
            ],  # fmt: skip
            lambda: _trained(prior / "metrics.jsonl", s.prior_steps),
            env={"OMP_NUM_THREADS": "1"},  # one core per process
        ),
        Step(
            "reranker",
            _dalle(
                "train-reranker",
                "--shards",
                train_shards,
                "--tokenizer",
                str(tok),
                "--out",
                str(rerank),
                "--steps",
                str(s.reranker_steps),
                "--seed",
                str(s.seed),
                "--device",
                s.device,
            ),  # fmt: skip
            _exists(rerank / "reranker.json"),
        ),
        Step(
            "export",
            _dalle(
                "export",
                "--prior",
                str(prior),
                "--dvae",
                str(dvae / "checkpoint.pt"),
                "--tokenizer",
                str(tok),
                "--reranker",
                str(rerank),
                "--out",
                str(export),
            ),  # fmt: skip
            _exists(export / "config.json"),
        ),
    ]
    for split, captions in (("seen", s.seen_captions), ("heldout", s.heldout_captions)):
        texts = [a for c in captions for a in ("--text", c)]
        gen = out / "samples" / split
        steps.append(
            Step(
                f"generate_{split}",
                _dalle(
                    "generate",
                    "--checkpoint",
                    str(export),
                    *texts,
                    "--n",
                    str(s.n_samples),
                    "--rerank",
                    str(s.rerank_k),
                    "--seed",
                    str(s.seed),
                    "--device",
                    s.device,
                    "--out",
                    str(gen),
                ),  # fmt: skip
                _exists(gen / "index.json"),
            )
        )
        for which, extra in (("all", []), ("reranked", ["--selected-only"])):
            result = out / "eval" / f"{split}_{which}.json"
            steps.append(
                Step(
                    f"eval_{split}_{which}",
                    _dalle("eval", "--generated", str(gen), "--judge", *extra, "--json", "--out", str(result)),
                    _exists(result),
                )
            )
    if s.inception:
        result = out / "eval" / "fid_seen.json"
        steps.append(
            Step(
                "eval_fid",
                _dalle(
                    "eval",
                    "--generated",
                    str(out / "samples" / "seen"),
                    "--reference",
                    str(held),
                    "--inception",
                    s.inception,
                    "--json",
                    "--out",
                    str(result),
                ),  # fmt: skip
                _exists(result),
            )
        )
    return steps


def native_bf16(device: str) -> bool:
    """Whether ``device`` (any ``--device`` value, ``auto`` included) computes bf16 matmuls natively (CPU: oneDNN
    with AVX512-BF16 or AMX; CUDA: Ampere+)."""
    import torch

    from ..devices import resolve_device

    if resolve_device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _precision_override(what: str, dtype: str, device: str) -> list[str]:
    """The demo's dVAE and prior compute in bf16 (configs/demo/*.yaml); a CPU without native bf16 would emulate it
    slower than fp32, so there they train in fp32 instead (same steps, more time; docs/demo.md)."""
    if dtype == "bf16" and not native_bf16(device):
        print(f"[dalle_dist] {device} has no native bf16 matmuls: the demo {what} trains in fp32 (slower)", flush=True)
        return ["--precision.dtype", "fp32"]
    return []


def _trained(metrics: Path, steps: int) -> bool:
    """A training step is complete when its metrics reach the last step (the trainers resume otherwise)."""
    if not metrics.is_file():
        return False
    lines = metrics.read_text().splitlines()
    return bool(lines) and json.loads(lines[-1]).get("step", 0) >= steps


def _tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def run_demo(s: DemoSettings, fresh: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run the steps (skipping completed ones), then write the report; returns summary.json's content."""
    from .report import write_report

    out = Path(s.out)
    if fresh and out.exists():
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(asdict(s), indent=1))
    timings_path = out / "logs" / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    steps = build_steps(s)
    t_start = time.perf_counter()
    for i, step in enumerate(steps, 1):
        tag = f"[{i:2d}/{len(steps)}] {step.name:<20}"
        if step.done():
            log(f"{tag} done already (remove {s.out} or pass --fresh to redo)")
            continue
        logfile = out / "logs" / f"{i:02d}_{step.name}.log"
        log(f"{tag} running ... (log: {logfile})")
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **step.env}
        env["PYTHONPATH"] = os.pathsep.join([str(IMPORT_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        with open(logfile, "w") as f:
            f.write("$ " + " ".join(step.cmd) + "\n")
            f.flush()
            proc = subprocess.run(step.cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
        timings[step.name] = round(time.perf_counter() - t0, 2)
        timings_path.write_text(json.dumps(timings, indent=1))
        if proc.returncode != 0:
            raise RuntimeError(
                f"demo step {step.name!r} failed (exit {proc.returncode}); last lines of {logfile}:\n{_tail(logfile)}"
            )
        log(f"{tag} {timings[step.name]:7.1f} s")
    log(f"[{len(steps) + 1:2d}/{len(steps) + 1}] report")
    t0 = time.perf_counter()
    summary = write_report(s, timings, steps_seconds=time.perf_counter() - t_start)
    timings["report"] = round(time.perf_counter() - t0, 2)
    timings_path.write_text(json.dumps(timings, indent=1))
    return summary
