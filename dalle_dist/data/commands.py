"""``dalle-dist data …``, ``dalle-dist tokenizer train`` and ``dalle-dist pretokenize``: argument definitions.

The work is done in the functions named below as ``"module:function"`` (imported only when the command runs);
each has the signature ``fn(args: argparse.Namespace) -> int`` (the process exit code).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any

Arg = tuple[tuple[str, ...], dict[str, Any]]

SHARDS_HELP = "shard paths: brace pattern(s), comma-separated"


def _arg(*flags: str, **kw: Any) -> Arg:
    """One ``add_argument`` call, as data."""
    return flags, kw


def _lazy(target: str) -> Callable[[argparse.Namespace, list[str]], int]:
    module, func = target.split(":")

    def run(args: argparse.Namespace, extra: list[str]) -> int:
        if extra:
            raise SystemExit(f"dalle-dist: unrecognized arguments: {' '.join(extra)}")
        return getattr(importlib.import_module(module), func)(args)

    return run


def _command(sub: Any, name: str, target: str, *args: Arg, help: str, description: str) -> None:
    """Add subcommand ``name`` of ``sub``, running ``target`` ("module:function"), with arguments ``args``."""
    p = sub.add_parser(name, help=help, description=description)
    for flags, kw in args:
        p.add_argument(*flags, **kw)
    p.set_defaults(run=_lazy(target))


def _group(sub: Any, name: str, help: str, description: str) -> Any:
    """Add command ``name`` whose subcommands are added to the returned subparsers (``dalle-dist NAME SUB``)."""
    p = sub.add_parser(name, help=help, description=description)
    return p.add_subparsers(dest=f"{name}_command", required=True, metavar=f"{name.upper()}_COMMAND")


def register(sub: Any) -> None:
    """Add the data commands to the top-level subparsers of ``dalle-dist``."""
    dsub = _group(sub, "data", "make, check and judge datasets", "Dataset tools.")
    _command(
        dsub,
        "shapes",
        "dalle_dist.data.shapes:cli_shapes",
        _arg("--out", required=True, help="output directory"),
        _arg("--n", type=int, required=True, help="number of training samples"),
        _arg("--n-heldout", type=int, default=0, help="also write this many samples of held-out combinations"),
        _arg("--size", type=int, default=64, help="image side in pixels (default 64)"),
        _arg("--shard-size", type=int, default=1000, help="samples per tar shard"),
        _arg("--seed", type=int, default=0),
        help="write the built-in synthetic captioned-shapes set as webdataset shards",
        description="Draw captioned images of coloured shapes procedurally and deterministically and write them as "
        "tar shards in img2dataset's layout, plus heldout.json: attribute combinations that never appear in "
        "training (for zero-shot composition tests).",
    )
    _command(
        dsub,
        "check",
        "dalle_dist.data.check:cli_check",
        _arg("shards", help=SHARDS_HELP),
        _arg("--stage", choices=["dvae", "prior"], required=True, help="which preprocessing listing to apply"),
        _arg("--resolution", type=int, default=256, help="output side R of the augmentation (default 256)"),
        _arg("--json", action="store_true", help="print only the JSON object"),
        help="run the training input pipeline over every sample once and count what is skipped",
        description='Prints one JSON object {"yielded": N, "skipped": {"reason": n, ...}}; exit 0 unless the shards '
        "cannot be opened at all.",
    )
    _command(
        dsub,
        "judge",
        "dalle_dist.data.shapes:cli_judge",
        _arg("shards", help=SHARDS_HELP),
        _arg("--json", action="store_true", help="print one JSON object"),
        help="score images against their captions with the synthetic set's judge",
        description="Read shards of the synthetic shapes set and report the fraction of caption attributes (colour, "
        "shape, position) the judge finds satisfied.",
    )

    tsub = _group(sub, "tokenizer", "train the BPE caption tokenizer", "BPE tokenizer tools.")
    _command(
        tsub,
        "train",
        "dalle_dist.data.tokenizer:cli_train",
        _arg("--shards", required=True, help=SHARDS_HELP),
        _arg("--out", required=True, help="output JSON file"),
        _arg("--vocab-size", type=int, default=16384),
        _arg("--min-frequency", type=int, default=2),
        _arg(
            "--max-tokens",
            type=int,
            default=256,
            help="report how many captions exceed this many tokens (paper: 256); 0 skips this second pass",
        ),
        help="train a lowercase BPE tokenizer on the captions of shards",
        description="Train a BPE tokenizer with HF tokenizers on the captions of shards (lowercased; 16,384 tokens by "
        "default [P §2.2]) and save it as the library's JSON. Id 0 is the pad token.",
    )

    _command(
        sub,
        "pretokenize",
        "dalle_dist.data.pretokenize:cli_pretokenize",
        _arg("--shards", required=True, help="input " + SHARDS_HELP),
        _arg("--dvae", required=True, help="dVAE checkpoint (checkpoint.pt from train-dvae)"),
        _arg("--out", required=True, help="output directory for token shards"),
        _arg("--procs", type=int, default=1, help="worker processes"),
        _arg("--shard-size", type=int, default=1000, help="samples per output shard"),
        _arg("--batch-size", type=int, default=64),
        _arg("--device", default="auto"),
        help="encode image shards into dVAE token shards for the prior",
        description="Run a trained dVAE encoder (argmax codes [P §2.2]) over image/caption shards, split over "
        "processes, and write token shards (uint16 codes + caption) that the prior reads without decoding "
        "images.",
    )
