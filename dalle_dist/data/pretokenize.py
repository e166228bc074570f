"""``dalle-dist pretokenize``: image shards → dVAE token shards the prior reads without decoding images.

    dalle-dist pretokenize --shards 'data/{000000..000099}.tar' --dvae runs/dvae/checkpoint.pt \\
        --out data/tokens --procs 8 --batch-size 64

The prior trains on argmax codes of the dVAE's encoder [P §2.2]. Each image gets the deterministic view the
openai usage notebook gives its encoder [C]: the centre square crop resized to the dVAE's input side (area
averaging as in the listings; bicubic when growing). Random augmentation is deliberately not applied here: one
frozen random crop per image would be a worse view than the centre, not an augmentation. The filters
(caption length, aspect ratio, plugins) are those of the dVAE checkpoint's ``data`` config, so the prior sees
the same pairs the dVAE was trained on.

Output, in ``--out``:

- ``p{proc:03d}-{n:06d}.tar`` token shards, one sample per kept image: ``KEY.codes.npy`` (the code grid,
  uint16, shape (grid, grid), ``np.save`` format), ``KEY.txt`` (the cleaned caption), ``KEY.json`` (source
  shard and key, grid, vocab size, source width and height);
- ``manifest.json``: shard names, sample and skip counts, dVAE path, image size, grid, vocab size.

The input shards are split over ``--procs`` spawned processes (shard i → process i mod procs); each loads the
dVAE, encodes in batches of ``--batch-size`` and writes its own output shards, so every input sample is
written at most once and nothing is shared between processes.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from ..config import DataConfig, from_dict
from ..devices import resolve_device
from .pipeline import CODES_EXTENSION, ImageProcessor, ImageSample
from .shards import expand_shards, read_shard

FORMAT = "dalle_dist.tokens/1"


@dataclass
class Job:
    """One process's share of the work."""

    proc: int
    shards: list[tuple[int, str]]  # (index in the full shard list, path)
    dvae: str
    out: str
    shard_size: int
    batch_size: int
    device: str
    threads: int
    progress: bool


def codes_bytes(codes: np.ndarray) -> bytes:
    """(grid, grid) uint16 → ``.npy`` bytes."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(codes, dtype=np.uint16), allow_pickle=False)
    return buf.getvalue()


def dvae_data_config(path: str) -> tuple[Any, DataConfig]:
    """The dVAE checkpoint's model and data configs (its filters apply to the prior's pairs too)."""
    from ..files import load_checkpoint

    state = load_checkpoint(path)
    if state.get("stage") != "dvae":
        raise ValueError(f"{path!r} is a {state.get('stage')!r} checkpoint; pretokenize needs a dVAE checkpoint")
    cfg = from_dict("dvae", state["config"])
    return cfg.model, cfg.data


@torch.no_grad()
def encode_batch(dvae: torch.nn.Module, items: list[ImageSample], device: torch.device) -> np.ndarray:
    """Preprocessed uint8 images → argmax codes (B, grid, grid) uint16, exactly ``dvae.encode_codes``."""
    x = torch.from_numpy(np.stack([s.image for s in items])).to(device)  # (B, R, R, 3) uint8
    x = x.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, R, R) in [0, 1]
    return dvae.encode_codes(x).cpu().numpy().astype(np.uint16)  # (B, g, g)


def run_job(job: Job) -> dict[str, Any]:
    """Encode and write this process's shards; returns its counts and the shards it wrote."""
    from ..models.loading import load_dvae

    torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    model_cfg, data_cfg = dvae_data_config(job.dvae)
    dvae = load_dvae(job.dvae, device)
    processor = ImageProcessor("centre", model_cfg.image_size, data_cfg)
    skipped: Counter = Counter()
    counted: Counter = Counter()
    writer: wds.ShardWriter | None = None
    written = 0
    pending: list[ImageSample] = []
    job_paths = dict(job.shards)
    bar = tqdm(desc=f"pretokenize p{job.proc}", unit="img", position=job.proc, disable=not job.progress)

    def flush() -> None:
        nonlocal writer, written
        if not pending:
            return
        codes = encode_batch(dvae, pending, device)  # (B, g, g) uint16
        if writer is None:  # opened on the first sample: a process with nothing to write leaves no empty tar
            pattern = os.path.join(job.out, f"p{job.proc:03d}-%06d.tar")
            writer = wds.ShardWriter(pattern, maxcount=job.shard_size, verbose=0)
        for item, grid in zip(pending, codes):
            meta = {
                "source_shard": job_paths[item.shard],
                "source_key": item.key,
                "grid": int(grid.shape[0]),
                "vocab_size": model_cfg.vocab_size,
                "width": item.meta.get("width"),
                "height": item.meta.get("height"),
            }
            sample = {"__key__": item.key, CODES_EXTENSION: codes_bytes(grid), "txt": item.caption}
            writer.write({**sample, "json": json.dumps(meta)})
        written += len(pending)
        bar.update(len(pending))
        pending.clear()

    for index, path in job.shards:
        for n, raw in enumerate(read_shard(path, skipped)):
            raw.update(__shard__=index, __index__=n, __epoch__=0)
            item = processor(raw, skipped, counted)
            if item is not None:
                pending.append(item)
                if len(pending) == job.batch_size:
                    flush()
    flush()
    if writer is not None:
        writer.close()
    bar.close()
    names = sorted(f for f in os.listdir(job.out) if f.startswith(f"p{job.proc:03d}-") and f.endswith(".tar"))
    return {"proc": job.proc, "written": written, "skipped": dict(skipped), "counted": dict(counted), "shards": names}


def _device_for(name: str, proc: int) -> str:
    """Process ``proc``'s device: a bare ``cuda`` spreads the processes over the visible GPUs."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return f"cuda:{proc % torch.cuda.device_count()}"
    return str(device)


def _check_output(dvae: str, out: str) -> Any:
    """The dVAE's model config, once its vocab fits uint16 and ``out`` (created) holds no ``.tar`` yet."""
    model_cfg, _ = dvae_data_config(dvae)
    if model_cfg.vocab_size > 2**16:
        raise ValueError(f"dVAE vocab {model_cfg.vocab_size} does not fit the uint16 token shards")
    os.makedirs(out, exist_ok=True)
    if any(f.endswith(".tar") for f in os.listdir(out)):
        raise ValueError(f"output directory {out!r} already holds .tar files; give an empty or new --out")
    return model_cfg


def _run_jobs(jobs: list[Job]) -> list[dict[str, Any]]:
    """Each job's counts: in this process for a single job, else in a pool of spawned processes."""
    if len(jobs) == 1:
        return [run_job(jobs[0])]
    with mp.get_context("spawn").Pool(len(jobs)) as pool:  # spawn: safe with CUDA and with torch threads
        return pool.map(run_job, jobs)


def _manifest(results: list[dict[str, Any]], shards: list[str], dvae: str, model_cfg: Any, procs: int) -> dict:
    """``manifest.json``'s content (without ``seconds``) from the jobs' results."""
    skipped: Counter = Counter()
    counted: Counter = Counter()
    for r in results:
        skipped.update(r["skipped"])
        counted.update(r["counted"])
    return {
        "format": FORMAT,
        "samples": sum(r["written"] for r in results),
        "shards": sorted(name for r in results for name in r["shards"]),
        "skipped": dict(sorted(skipped.items())),
        "counted": dict(sorted(counted.items())),
        "source_shards": len(shards),
        "dvae": os.path.abspath(dvae),
        "image_size": model_cfg.image_size,
        "grid": model_cfg.grid,
        "vocab_size": model_cfg.vocab_size,
        "dtype": "uint16",
        "preprocess": "centre square crop; area resize to image_size (bicubic when growing); rint, clip",
        "procs": procs,
    }


def pretokenize(
    shards: list[str],
    dvae: str,
    out: str,
    procs: int = 1,
    shard_size: int = 1000,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Run the jobs (in spawned processes when ``procs`` > 1) and write ``manifest.json``; returns it."""
    model_cfg = _check_output(dvae, out)
    procs = max(1, min(procs, len(shards)))
    threads = max(1, (os.cpu_count() or 1) // procs)
    jobs = [
        Job(
            p,
            list(enumerate(shards))[p::procs],
            dvae,
            out,
            shard_size,
            batch_size,
            _device_for(device, p),
            threads,
            progress,
        )
        for p in range(procs)
    ]
    t0 = time.perf_counter()
    results = _run_jobs(jobs)
    manifest = _manifest(results, shards, dvae, model_cfg, procs)
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    Path(out, "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def cli_pretokenize(args: argparse.Namespace) -> int:
    try:
        shards = expand_shards(args.shards)  # a bad pattern raises ShardError, a ValueError
        if args.procs < 1 or args.shard_size < 1 or args.batch_size < 1:
            raise ValueError("--procs, --shard-size and --batch-size must be >= 1")
        manifest = pretokenize(
            shards, args.dvae, args.out, args.procs, args.shard_size, args.batch_size, args.device, progress=True
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"dalle-dist pretokenize: {err}", file=sys.stderr)
        return 2
    summary = {k: manifest[k] for k in ("samples", "skipped", "counted", "grid", "vocab_size")}
    print(json.dumps({"out": args.out, "shards": len(manifest["shards"]), **summary}, sort_keys=True))
    return 0
