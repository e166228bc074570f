"""The trainers by stage name: ``dalle-dist train-<stage>`` and ``launch/run.py --stage <stage>`` look them up here."""

from __future__ import annotations

from .dvae import DVAETrainer
from .prior import PriorTrainer

TRAINERS: dict[str, type[DVAETrainer] | type[PriorTrainer]] = {"dvae": DVAETrainer, "prior": PriorTrainer}

__all__ = ["TRAINERS", "DVAETrainer", "PriorTrainer"]
