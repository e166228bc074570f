"""Run a function on N gloo ranks on localhost and collect what each rank returns.

    from _spawn import run_distributed

    def check(rank: int, world: int, scale: float) -> float:   # module level, so spawn can import it
        t = torch.full((2,), float(rank)); dist.all_reduce(t); return float(t[0]) * scale

    assert run_distributed(check, 2, 0.5) == [0.5, 0.5]

- Ranks start from a ``forkserver`` that has imported torch once per test session (a spawned interpreter
  spends seconds importing torch on a busy machine; plain fork after torch has started threads is unsafe), with
  one intra-op thread each so four ranks do not fight over a small machine.
- The rendezvous store lives in the parent (``TCPStore`` on port 0: the OS picks a free port, no race), and the
  default process group is initialised before ``fn(rank, world, *args)`` and destroyed after it.
- An exception in a rank fails the caller with that rank's traceback; a hang fails after ``timeout`` seconds
  (the collectives time out too, so the ranks exit on their own).
- Return values travel back through ``torch.save`` files: tensors, numbers, dicts and lists are fine.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(
    rank: int, fn: Callable[..., Any], world: int, port: int, out_dir: str, timeout: float, args: tuple
) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=datetime.timedelta(seconds=timeout))
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout)
    )
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


_PRELOAD = ["torch", "torch.distributed", "torch.nn"]


def run_distributed(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 45.0) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks → the list of return values, by rank."""
    mp.set_forkserver_preload(_PRELOAD + [fn.__module__])
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(fn, world, store.port, out_dir, timeout, args),
            nprocs=world,
            join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout + 15  # + start-up: a hang fails within a minute
        try:
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish in {timeout + 15:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
