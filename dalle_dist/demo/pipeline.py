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


@dataclass(frozen=True)
class _Paths:
    """Where the steps write, under ``DemoSettings.out``."""

    out: Path
    data: Path  # the shapes set's training shards and manifest
    held: Path  # its held-out images (FID's reference)
    train_shards: str  # brace pattern of the training shards
    tok: Path
    dvae: Path
    tokens: Path
    prior: Path
    rerank: Path
    export: Path

    @classmethod
    def of(cls, s: DemoSettings) -> _Paths:
        """The paths of the run ``s`` describes."""
        out = Path(s.out)
        data = out / "data"
        n_shards = (s.n_train + s.shard_size - 1) // s.shard_size
        train_shards = str(data / f"train-{{000000..{n_shards - 1:06d}}}.tar")
        return cls(out, data, data / "heldout", train_shards, out / "tokenizer.json", out / "dvae", out / "tokens",
                   out / "prior", out / "reranker", out / "export")  # fmt: skip


_NO_WANDB = ("--train.wandb", "disabled")


def _data_cmd(s: DemoSettings, p: _Paths, image_size: int) -> list[str]:
    """Step 1: training shards + shards of held-out (colour, shape) pairs [P §3 zero-shot]."""
    return _dalle("data", "shapes", "--out", str(p.data), "--n", str(s.n_train), "--n-heldout", str(s.n_heldout),
                  "--shard-size", str(s.shard_size), "--size", str(image_size), "--seed", str(s.seed))  # fmt: skip


def _dvae_cmd(s: DemoSettings, p: _Paths, precision: list[str]) -> list[str]:
    """Step 3: the dVAE [P §2.1]."""
    return _dalle("train-dvae", "--config", str(CONFIGS / "dvae.yaml"), "--data.shards", p.train_shards,
                  "--train.steps", str(s.dvae_steps),
                  # τ and lr follow the run's length, so --dvae-steps N still ends at τ = 1/16 [P A.2]
                  "--optim.temp_steps", str(s.dvae_steps), "--optim.lr_steps", str(s.dvae_steps),
                  "--train.out_dir", str(p.dvae), "--train.device", s.device, "--train.seed", str(s.seed),
                  *precision, *_NO_WANDB)  # fmt: skip


def _pretokenize_cmd(s: DemoSettings, p: _Paths) -> list[str]:
    """Step 4: images → dVAE argmax codes [P §2.2]."""
    return _dalle("pretokenize", "--shards", p.train_shards, "--dvae", str(p.dvae / "checkpoint.pt"),
                  "--out", str(p.tokens), "--procs", "2", "--shard-size", str(s.shard_size),
                  "--device", s.device)  # fmt: skip


def _prior_cmd(s: DemoSettings, p: _Paths, warmup: int, precision: list[str]) -> list[str]:
    """Step 5: the prior on 2 gloo processes, by torchrun of the package's launcher [P §2.2, §2.5]."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", LAUNCHER,
            "--stage", "prior", "--config", str(CONFIGS / "prior.yaml"),
            "--data.shards", str(p.tokens), "--data.tokenizer", str(p.tok), "--parallel.topology", s.topology,
            "--train.steps", str(s.prior_steps),
            "--optim.lr_steps",  # the cosine decay ends with the run (it must start after warmup)
            str(max(s.prior_steps, warmup + 1)),
            "--train.out_dir", str(p.prior), "--train.device", s.device, "--train.seed", str(s.seed),
            "--train.progress", "false", *precision, *_NO_WANDB]  # fmt: skip


def _reranker_cmd(s: DemoSettings, p: _Paths) -> list[str]:
    """Step 6: the contrastive reranker [P §2.6]."""
    return _dalle("train-reranker", "--shards", p.train_shards, "--tokenizer", str(p.tok), "--out", str(p.rerank),
                  "--steps", str(s.reranker_steps), "--seed", str(s.seed), "--device", s.device)  # fmt: skip


def _export_cmd(p: _Paths) -> list[str]:
    """Step 7: prior + dVAE + tokenizer + reranker in one directory."""
    return _dalle("export", "--prior", str(p.prior), "--dvae", str(p.dvae / "checkpoint.pt"), "--tokenizer", str(p.tok),
                  "--reranker", str(p.rerank), "--out", str(p.export))  # fmt: skip


def _generate_cmd(s: DemoSettings, p: _Paths, captions: list[str], gen: Path) -> list[str]:
    """Step 8: N samples per caption, reranked to the best K [P §2.6]."""
    texts = [a for c in captions for a in ("--text", c)]
    return _dalle("generate", "--checkpoint", str(p.export), *texts, "--n", str(s.n_samples),
                  "--rerank", str(s.rerank_k), "--seed", str(s.seed), "--device", s.device,
                  "--out", str(gen))  # fmt: skip


def _training_steps(s: DemoSettings, p: _Paths) -> list[Step]:
    """Steps 1-7, from the data to the export."""
    # The demo's configs as the trainers will read them (flavor → YAML → the data paths below): the images are
    # drawn at the side the dVAE reads, and the prior's cosine must end after its warmup.
    dvae_cfg = build_config("dvae", [CONFIGS / "dvae.yaml"], {"data.shards": p.train_shards})
    prior_cfg = build_config(
        "prior", [CONFIGS / "prior.yaml"], {"data.shards": str(p.tokens), "data.tokenizer": str(p.tok)}
    )
    dvae_precision = _precision_override("dVAE", dvae_cfg.precision.dtype, s.device)
    prior_precision = _precision_override("prior", prior_cfg.precision.dtype, s.device)
    tokenizer_cmd = _dalle("tokenizer", "train", "--shards", p.train_shards, "--out", str(p.tok), "--vocab-size", "512")
    return [
        Step("data", _data_cmd(s, p, dvae_cfg.model.image_size), _exists(p.data / "manifest.json")),
        Step("tokenizer", tokenizer_cmd, _exists(p.tok)),
        Step("dvae", _dvae_cmd(s, p, dvae_precision), lambda: _trained(p.dvae / "metrics.jsonl", s.dvae_steps)),
        Step("pretokenize", _pretokenize_cmd(s, p), _exists(p.tokens / "manifest.json")),
        Step("prior", _prior_cmd(s, p, prior_cfg.optim.warmup_steps, prior_precision),
             lambda: _trained(p.prior / "metrics.jsonl", s.prior_steps),
             env={"OMP_NUM_THREADS": "1"}),  # one core per process
        Step("reranker", _reranker_cmd(s, p), _exists(p.rerank / "reranker.json")),
        Step("export", _export_cmd(p), _exists(p.export / "config.json")),
    ]  # fmt: skip


def _sampling_steps(s: DemoSettings, p: _Paths) -> list[Step]:
    """Steps 8-9 per split (seen, held-out): generate, then judge all samples and the reranked ones; FID / IS of
    the seen samples against the held-out images when the Inception weights are given."""
    steps = []
    for split, captions in (("seen", s.seen_captions), ("heldout", s.heldout_captions)):
        gen = p.out / "samples" / split
        steps.append(Step(f"generate_{split}", _generate_cmd(s, p, captions, gen), _exists(gen / "index.json")))
        for which, extra in (("all", []), ("reranked", ["--selected-only"])):
            result = p.out / "eval" / f"{split}_{which}.json"
            cmd = _dalle("eval", "--generated", str(gen), "--judge", *extra, "--json", "--out", str(result))
            steps.append(Step(f"eval_{split}_{which}", cmd, _exists(result)))
    if s.inception:
        result = p.out / "eval" / "fid_seen.json"
        cmd = _dalle("eval", "--generated", str(p.out / "samples" / "seen"), "--reference", str(p.held),
                     "--inception", s.inception, "--json", "--out", str(result))  # fmt: skip
        steps.append(Step("eval_fid", cmd, _exists(result)))
    return steps


def build_steps(s: DemoSettings) -> list[Step]:
    """The demo's steps in order (the module docstring lists them); nothing is run."""
    p = _Paths.of(s)
    return _training_steps(s, p) + _sampling_steps(s, p)


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
