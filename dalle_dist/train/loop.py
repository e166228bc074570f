"""The one training loop of both stages, on one process or many: resume → step → log → save.

Both trainers derive from :class:`LoopTrainer`, which holds what they share (config, step count, output directory,
rank, the process group they may have started) and brings ``fit`` and ``close``; each brings ``run_name``,
``build()`` (which sets ``rank`` and ``_created_group``), ``resume()`` (loads the latest complete checkpoint when
``train.resume``; returns its step or None), ``step()`` (one update, its metrics) and ``save()`` (collective).
Rank 0 writes ``config.json``, ``metrics.jsonl`` (and wandb) and the progress bar; every rank steps and saves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..config import to_dict
from .metrics import MetricsLogger
from .runtime import close_distributed


class LoopTrainer:
    """What both stages' trainers share; ``fit()`` runs :func:`fit`, ``close()`` ends a group ``build()`` started."""

    run_name = ""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.out_dir = Path(cfg.train.out_dir)
        self.step_num = 0  # counts batches, applied or skipped
        self.rank = 0
        self._built = False
        self._created_group = False

    @property
    def is_main(self) -> bool:
        """The rank that logs and writes single files (rank 0)."""
        return self.rank == 0

    def build(self) -> Any:
        raise NotImplementedError

    def resume(self) -> int | None:
        raise NotImplementedError

    def step(self) -> dict[str, float]:
        raise NotImplementedError

    def save(self) -> Any:
        raise NotImplementedError

    def fit(self) -> list[dict[str, float]]:
        """Build if needed, resume, train to ``train.steps``; rank 0 logs."""
        return fit(self)

    def close(self) -> None:
        close_distributed(self._created_group)


def fit(trainer: LoopTrainer) -> list[dict[str, float]]:
    """Train to ``train.steps`` from the latest complete checkpoint (if any); returns every step's metrics."""
    if not trainer._built:
        trainer.build()
    cfg = trainer.cfg
    saved_at = trainer.resume()
    total, every, save_every = cfg.train.steps, cfg.train.log_every, cfg.train.save_every
    history: list[dict[str, float]] = []
    log = None
    if trainer.is_main:
        out = trainer.out_dir
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        log = MetricsLogger(out, to_dict(cfg), cfg.train.wandb, name=trainer.run_name)
    bar = tqdm(
        total=total,
        initial=trainer.step_num,
        desc=f"train {trainer.run_name}",
        disable=not (cfg.train.progress and trainer.is_main),
        dynamic_ncols=True,
    )
    try:
        while trainer.step_num < total:
            metrics = trainer.step()
            history.append(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            if log is not None and every > 0 and (trainer.step_num % every == 0 or trainer.step_num == total):
                log.log(metrics)
            if save_every > 0 and trainer.step_num % save_every == 0:
                trainer.save()
                saved_at = trainer.step_num
        if saved_at != trainer.step_num:
            trainer.save()
    finally:
        bar.close()
        if log is not None:
            log.close()
    return history
