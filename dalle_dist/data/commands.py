"""``dalle-dist data …``, ``dalle-dist tokenizer train`` and ``dalle-dist pretokenize``: argument definitions.

The work is done in the modules named below (imported only when the command runs); each entry point has the
signature ``fn(args: argparse.Namespace) -> int`` (the process exit code).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any


def _lazy(module: str, func: str) -> Callable[[argparse.Namespace, list[str]], int]:
    def run(args: argparse.Namespace, extra: list[str]) -> int:
        if extra:
            raise SystemExit(f"dalle-dist: unrecognized arguments: {' '.join(extra)}")
        return getattr(importlib.import_module(module), func)(args)

    return run


def register(sub: Any) -> None:
    """Add the data commands to the top-level subparsers of ``dalle-dist``."""
    data = sub.add_parser("data", help="make, check and judge datasets", description="Dataset tools.")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    p = dsub.add_parser(
        "shapes",
        help="write the built-in synthetic captioned-shapes set as webdataset shards",
        description="Draw captioned images of coloured shapes procedurally and deterministically and write them as "
        "tar shards in img2dataset's layout, plus heldout.json: attribute combinations that never appear in "
        "training (for zero-shot composition tests).",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, required=True, help="number of training samples")
    p.add_argument("--n-heldout", type=int, default=0, help="also write this many samples of held-out combinations")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_lazy("dalle_dist.data.shapes", "cli_shapes"))

    p = dsub.add_parser(
        "check",
        help="run the training input pipeline over every sample once and count what is skipped",
        description='Prints one JSON object {"yielded": N, "skipped": {"reason": n, ...}}; exit 0 unless the shards '
        "cannot be opened at all.",
    )
    p.add_argument("shards", help="shard paths: brace pattern(s), comma-separated")
    p.add_argument("--stage", choices=["dvae", "prior"], required=True, help="which preprocessing listing to apply")
    p.add_argument("--resolution", type=int, default=256, help="output side R of the augmentation (default 256)")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.set_defaults(run=_lazy("dalle_dist.data.check", "cli_check"))

    p = dsub.add_parser(
        "judge",
        help="score images against their captions with the synthetic set's judge",
        description="Read shards of the synthetic shapes set and report the fraction of caption attributes (colour, "
        "shape, position) the judge finds satisfied.",
    )
    p.add_argument("shards", help="shard paths: brace pattern(s), comma-separated")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_lazy("dalle_dist.data.shapes", "cli_judge"))

    tok = sub.add_parser("tokenizer", help="train the BPE caption tokenizer", description="BPE tokenizer tools.")
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="TOKENIZER_COMMAND")
    p = tsub.add_parser(
        "train",
        help="train a lowercase BPE tokenizer on the captions of shards",
        description="Train a BPE tokenizer with HF tokenizers on the captions of shards (lowercased; 16,384 tokens "
        "by default [P §2.2]) and save it as the library's JSON. Id 0 is the pad token.",
    )
    p.add_argument("--shards", required=True, help="shard paths: brace pattern(s), comma-separated")
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        help="report how many captions exceed this many tokens (paper: 256); 0 skips this second pass",
    )
    p.set_defaults(run=_lazy("dalle_dist.data.tokenizer", "cli_train"))

    p = sub.add_parser(
        "pretokenize",
        help="encode image shards into dVAE token shards for the prior",
        description="Run a trained dVAE encoder (argmax codes [P §2.2]) over image/caption shards, split over "
        "processes, and write token shards (uint16 codes + caption) that the prior reads without decoding images.",
    )
    p.add_argument("--shards", required=True, help="input shard paths: brace pattern(s), comma-separated")
    p.add_argument("--dvae", required=True, help="dVAE checkpoint (checkpoint.pt from train-dvae)")
    p.add_argument("--out", required=True, help="output directory for token shards")
    p.add_argument("--procs", type=int, default=1, help="worker processes")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per output shard")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_lazy("dalle_dist.data.pretokenize", "cli_pretokenize"))
