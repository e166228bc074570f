"""Measured against modelled memory: a mid-size prior trains for real on 1 and 2 CPU gloo processes in several
topologies, and each rank's peak is printed next to ``plan --dry-run``'s prediction for the same run config.

    .venv/bin/python benchmarks/memory.py              # prints one JSON object (a few minutes on 2 CPU cores)
    make bench-memory

- The model: 8 layers × 1536 wide (≈ 226M resblock parameters, ≈ 300M in all), 32 text + 8×8 image tokens, in fp32
  and in bf16 (16-bit values in fp32 storage, bf16 Adam moments: ``ShardedAdamW32``), global batch 2 (1 sample per
  data-parallel rank; pp=2: 4 in 2 microbatches), 3 steps (the optimizer state exists from step 1, the EMA too).
  Its tensors dominate each rank's memory, so the figure says whether the dry run counts what runs.
- Measured: each rank's peak resident memory (``ru_maxrss``) less its resident memory after the process group
  started and before the trainer was built. On Linux, glibc serves tensors of this size by ``mmap`` and returns
  them on free, so the peak RSS is the peak of the live tensors plus what the process allocates besides them.
- Predicted: ``dry_run(opts, run_cfg)`` for the very run config the ranks trained with (``--attention math``: on the
  CPU, SDPA with a mask materialises the scores), per pp rank.
- When a GPU is present and ``--device cuda`` is given, ``torch.cuda.max_memory_allocated`` is measured instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dalle_dist.config import build_config
from dalle_dist.parallel.topology import Topology
from dalle_dist.plan_dry_run import DryRunOptions, dry_run

TOPOLOGIES = ("pp=1", "shard=2", "replicate=2", "pp=2")  # pp=1: one process, the 1-rank job
MODEL = {"model.n_layers": "8", "model.d_model": "1536", "model.n_heads": "12", "model.text_len": "32",
         "model.grid": "8", "model.text_vocab": "16384", "model.image_vocab": "8192"}  # fmt: skip


def run_config(topology: str, out: str, steps: int, device: str, precision: str = "fp32"):  # noqa: ANN201
    over = {**MODEL, "parallel.topology": topology, "data.batch_size": "2", "train.steps": str(steps),
            "train.out_dir": out, "train.progress": "false", "train.device": device,
            "optim.ema_every": "1", "precision.dtype": precision}  # fmt: skip
    if topology.startswith("pp="):
        over["parallel.n_microbatches"] = "2"
        over["data.batch_size"] = "4"
    return build_config("prior", ["configs/prior/tiny.yaml"], over)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rank(rank: int, world: int, port: int, topology: str, out: str, steps: int, device: str, precision: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=datetime.timedelta(seconds=600))
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    from dalle_dist.train.prior import PriorTrainer

    cfg = run_config(topology, out, steps, device, precision)
    base = _rss_bytes()
    trainer = PriorTrainer(cfg).build()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        trainer.step()
    dist.barrier()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss
    pp_rank = trainer.topology.coords(rank)[0]
    torch.save({"rank": rank, "pp_rank": pp_rank, "measured_bytes": int(peak)}, Path(out) / f"mem_{rank}.pt")
    dist.destroy_process_group()


def measure(topology: str, steps: int, device: str, precision: str) -> list[dict]:
    """Train on the topology's ranks (spawned processes); each rank's measured peak."""
    world = Topology.parse(topology).world_size
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, timeout=datetime.timedelta(seconds=600),
                          wait_for_workers=False)  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(world, store.port, topology, out, steps, device, precision), nprocs=world,
                           start_method="spawn")  # fmt: skip
        return [torch.load(Path(out) / f"mem_{r}.pt", weights_only=True) for r in range(world)]


def predict(topology: str, steps: int, device: str, precision: str) -> dict[int, int]:
    """The dry run of the same run config: predicted peak bytes per pp rank."""
    cfg = run_config(topology, "unused", steps, device, precision)
    opts = DryRunOptions(flavor="tiny", topology=cfg.parallel.topology, attention="math", gpu="h100-80gb")
    result = dry_run(opts, cfg)
    return {r["pp_rank"]: int(r["memory"]["total"]) for r in result["ranks"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topologies", default=";".join(TOPOLOGIES), help="';'-separated topologies (1 or 2 processes)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated precision.dtype values to measure")
    args = p.parse_args()
    start = time.perf_counter()
    rows = []
    for precision in args.precision.split(","):
        for topology in args.topologies.split(";"):
            predicted = predict(topology, args.steps, args.device, precision)
            for r in measure(topology, args.steps, args.device, precision):
                want = predicted[r["pp_rank"]]
                rows.append({"topology": topology, "precision": precision, **r, "predicted_bytes": want,
                             "measured_over_predicted": round(r["measured_bytes"] / want, 4)})  # fmt: skip
    ratios = [r["measured_over_predicted"] for r in rows]
    out = {
        "device": args.device,
        "model": MODEL,
        "measure": "ru_maxrss growth after the process group started"
        if args.device == "cpu"
        else "torch.cuda.max_memory_allocated",  # fmt: skip
        "ranks": rows,
        "max_relative_error": round(max(abs(x - 1) for x in ratios), 4),
        "within_15pct": all(abs(x - 1) <= 0.15 for x in ratios),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
