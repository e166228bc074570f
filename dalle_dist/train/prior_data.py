"""The prior's batches on any topology: random tokens, pretokenized shards, or a folder of pairs.

``data.batch_size`` is the global batch. Data is split over the data-parallel ranks (replicate × shard) only;
every pipeline stage of a replica reads the same samples. One process is the 1-rank case of the same split, so a
run on any topology sees exactly the samples one process sees:

- ``random``: every rank draws the step's whole global batch from (seed, step) and keeps its slice;
- ``folder``: every rank encodes the folder once with the dVAE's argmax codes, draws the global batch's indices
  from one seeded sampler and keeps its slice (the sampler's cursor is rank-independent: it goes in trainer.pt);
- ``tokens``: each dp rank reads its own share of the shards with batch_size / dp (one cursor file per dp rank).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import PriorRunConfig
from ..data.folder import EpochSampler, read_folder
from ..data.pipeline import CODES_EXTENSION, ShardLoader, load_codes, token_loader
from ..data.random_batches import random_tokens
from ..data.shards import expand_shards, read_shard
from ..data.text import build_tokenizer, pad_batch
from ..models.loading import load_dvae
from ..parallel.topology import Topology


def check_token_grid(shards: str, grid: int) -> None:
    """Fail at build time, with the fix, when the token shards were made by a dVAE of another grid."""
    for raw in read_shard(expand_shards(shards)[0], Counter()):
        if raw.get(CODES_EXTENSION) is None:
            raise ValueError(
                f"{raw.get('__url__')!r} holds no .codes.npy members: data.source=tokens needs the output of "
                "dalle-dist pretokenize, not image shards"
            )
        found = int(load_codes(raw[CODES_EXTENSION]).shape[0])
        if found != grid:
            raise ValueError(
                f"token shards hold {found}×{found} code grids but the prior expects {grid}×{grid}: "
                f"set --model.grid {found}"
            )
        return


def restore_cursor(loader: ShardLoader, path: Path, name: str, pattern: str, announce: bool) -> None:
    """Load this rank's shard cursor ``path/name``; on another layout restart the earliest epoch any reader was in.

    The shard split depends on dp_size × readers, so old cursors cannot be mapped onto new readers. Restarting at
    the beginning of the earliest saved epoch skips nothing of it (some samples are seen twice) and keeps the epoch
    count, hence the shard permutation, moving on.
    """
    file, reason = path / name, ""
    if file.is_file():
        try:
            loader.load_state_dict(torch.load(file, weights_only=True))
            return
        except ValueError as err:  # saved with another data.num_workers
            reason = str(err)
    saved = [torch.load(f, weights_only=True) for f in sorted(path.glob(pattern))]
    epoch = min((int(c["epoch"]) for st in saved for c in st["cursors"]), default=0)
    loader.load_state_dict({
        "format": 1, "dp_rank": loader.dp_rank, "dp_size": loader.dp_size, "num_readers": loader.num_readers,
        "cursors": [{"epoch": epoch, "shard_index": 0, "sample_offset": 0}] * loader.num_readers,
        "next_reader": 0, "skipped": {}, "counted": {},
    })  # fmt: skip
    if announce:
        why = reason or (
            f"the checkpoint's data cursors are for another data-parallel layout ({len(saved)} file(s), this run "
            f"has dp={loader.dp_size})"
            if saved
            else "the checkpoint holds no data cursor"
        )
        print(f"[dalle_dist] warning: {why}; the data stream restarts at the start of epoch {epoch}", flush=True)


class PriorData:
    """This rank's share of every step's global batch, and the cursors that make a resumed run read on."""

    def __init__(self, cfg: PriorRunConfig, topology: Topology, dp_rank: int, device: torch.device) -> None:
        self.cfg, self.topology, self.dp_rank, self.device = cfg, topology, dp_rank, device
        self.per_rank = cfg.data.batch_size // topology.dp_size
        self.loader: ShardLoader | None = None
        self.sampler: EpochSampler | None = None
        source = cfg.data.source
        if source == "tokens":
            self._build_tokens()
        elif source == "folder":
            self._build_folder()

    def _build_tokens(self) -> None:
        data, m = self.cfg.data, self.cfg.model
        check_token_grid(data.shards, m.grid)
        per_rank = dataclasses.replace(data, batch_size=self.per_rank)
        tokenizer = build_tokenizer(data, m.text_vocab)
        self.loader = token_loader(
            per_rank, tokenizer, m.caption_len, m.grid, m.image_vocab, m.text_pad_id,
            dp_rank=self.dp_rank, dp_size=self.topology.dp_size,
        )  # fmt: skip

    @torch.no_grad()
    def _build_folder(self) -> None:
        data, m = self.cfg.data, self.cfg.model
        dvae = load_dvae(data.dvae_checkpoint, self.device)
        if dvae.cfg.grid != m.grid or dvae.cfg.vocab_size != m.image_vocab:
            raise ValueError(
                f"dVAE makes a {dvae.cfg.grid}×{dvae.cfg.grid} grid of {dvae.cfg.vocab_size} codes but the prior "
                f"expects {m.grid}×{m.grid} of {m.image_vocab}: set --model.grid {dvae.cfg.grid} "
                f"--model.image_vocab {dvae.cfg.vocab_size}"
            )
        # Tokenized once here, so no BPE dropout: it would freeze one random segmentation per caption.
        tokenizer = build_tokenizer(data, m.text_vocab, training=False)
        pairs = read_folder(data.path, dvae.cfg.image_size)
        codes = [dvae.encode_codes(c.to(self.device).float() / 255.0).flatten(1).cpu() for c in pairs.images.split(64)]
        self.image_tokens = torch.cat(codes)  # (N, grid²)
        self.text_tokens = pad_batch([tokenizer.encode(c, m.caption_len) for c in pairs.captions], m.caption_len)
        self.sampler = EpochSampler(len(self.image_tokens), data.batch_size, data.seed)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """This rank's (text (B/dp, caption_len), image (B/dp, grid²)) of global batch ``step``."""
        data, m = self.cfg.data, self.cfg.model
        if self.loader is not None:
            b = self.loader.next_batch()  # already this dp rank's share
            return b["text"].to(self.device), b["image"].to(self.device)
        mine = slice(self.dp_rank * self.per_rank, (self.dp_rank + 1) * self.per_rank)
        if self.sampler is not None:
            idx = self.sampler.next_indices()[mine]
            text, image = self.text_tokens[idx], self.image_tokens[idx]
        else:
            text, image = random_tokens(
                data.batch_size, m.caption_len, m.text_vocab, m.image_len, m.image_vocab, data.seed, step
            )
            text, image = text[mine], image[mine]
        return text.to(self.device), image.to(self.device)

    # ---- checkpoints ------------------------------------------------------------------------------

    def _cursor_file(self) -> str:
        return f"data_dp{self.dp_rank}of{self.topology.dp_size}.pt"

    def state(self) -> dict[str, Any]:
        """The rank-independent part (trainer.pt): the folder sampler's cursor."""
        return {"sampler": self.sampler.state_dict()} if self.sampler is not None else {}

    def rank_files(self, pp_rank: int) -> dict[str, Any]:
        """Per-rank files: this dp rank's shard cursor (every pp stage of a dp rank holds the same one)."""
        if self.loader is None or pp_rank != 0:
            return {}
        return {self._cursor_file(): self.loader.state_dict()}

    def load(self, path: Path, state: dict[str, Any], announce: bool) -> None:
        if self.sampler is not None and "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
        if self.loader is not None:
            restore_cursor(self.loader, path, self._cursor_file(), "data_dp*of*.pt", announce)
