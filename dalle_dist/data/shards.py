"""Webdataset tar shards: spec expansion, a fault-tolerant sample reader, and a resumable split iterator.

Layout (img2dataset's): each sample is a group of tar members sharing a key, ``KEY.jpg|png|webp`` +
``KEY.txt`` [+ ``KEY.json``]; token shards written by ``dalle-dist pretokenize`` hold ``KEY.codes.npy`` instead
of the image. Members are grouped with webdataset's own tar iterators (``tar_file_expander`` →
``group_by_keys``) and an error handler that counts and continues, so a damaged shard costs its remaining
samples, never the run.

Splitting and the cursor (docs/data.md has the picture):

- every epoch e draws a seeded permutation of the whole shard list; data-parallel rank r of R takes the
  permuted shards r, r+R, r+2R, … and loader worker w of W takes every W-th of those. The readers'
  lists are disjoint and their union is the whole list, every epoch. Only data-parallel ranks split the
  data; pipeline stages and shards of one replica pass the same ``dp_rank``.
- uneven counts: when the shard count is not a multiple of R·W some readers get one shard more than others
  in an epoch. Nothing is dropped or repeated; since training is counted in steps and every reader streams
  epoch after epoch on its own, no reader waits for another. A reader must get at least one shard
  (n_shards ≥ R·W) or construction fails with the arithmetic in the message.
- within a shard, samples optionally pass through a seeded shuffle buffer (seed, epoch, shard).
- the cursor ``{epoch, shard_index, sample_offset}`` says where the reader stands: ``shard_index`` is the
  position in this reader's list for that epoch and ``sample_offset`` the number of samples of that shard
  already handed out. Resuming re-reads that shard from its start, replays the same shuffle and discards
  ``sample_offset`` samples (their bytes only: nothing is decoded), so the stream continues exactly where the
  uninterrupted one would have.
"""

from __future__ import annotations

import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from braceexpand import braceexpand
from webdataset.tariterators import group_by_keys, tar_file_expander

# Seeds of the three random streams, so shard order, within-shard order and augmentation never share draws.
SHARD_ORDER, WITHIN_SHARD, AUGMENT = 0, 1, 2

# tarfile messages that mean the archive ends early (vs. not being a tar at all).
_TRUNCATION = ("unexpected end of data", "truncated header", "empty header", "end of file header")


class ShardError(ValueError):
    """A shard spec the user must fix (nothing matches, a file is missing)."""


def _split_top_level(spec: str) -> list[str]:
    """Split on commas outside braces: ``"a/{0,1}.tar,b.tar"`` → ``["a/{0,1}.tar", "b.tar"]``."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def expand_shards(spec: str) -> list[str]:
    """Comma-separated brace patterns, files or directories → the list of local shard paths.

    ``"d/{000000..000009}.tar"`` expands with braceexpand (webdataset's own expansion); a directory stands for
    its ``*.tar`` files in name order. Every path must exist; the same path twice is kept once (a shard must
    never reach two readers).
    """
    patterns = _split_top_level(spec)
    if not patterns:
        raise ShardError(f"shard spec {spec!r} names no shards; give e.g. 'data/{{000000..000009}}.tar'")
    out: list[str] = []
    for pattern in patterns:
        if "://" in pattern or pattern.startswith("pipe:"):
            raise ShardError(f"shard {pattern!r}: only local paths are supported; copy the shards to disk first")
        for path in braceexpand(pattern):
            if os.path.isdir(path):
                tars = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".tar"))
                if not tars:
                    raise ShardError(f"shard directory {path!r} (from {pattern!r}) holds no .tar files")
                out.extend(tars)
            elif os.path.isfile(path):
                out.append(path)
            else:
                raise ShardError(f"shard file {path!r} (from pattern {pattern!r}) does not exist")
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------------------------------
# Reading one shard
# --------------------------------------------------------------------------------------------------


def read_shard(path: str, skipped: Counter) -> Iterator[dict[str, Any]]:
    """Samples of one tar file in archive order; errors are counted in ``skipped`` and reading stops or continues.

    Shard-level reasons: ``unreadable_shard`` (cannot be opened), ``corrupt_shard`` (not a tar, or empty),
    ``truncated_shard`` (the archive ends early: samples before the cut are kept). Member-level errors
    (``bad_tar_member``, e.g. a duplicate member name) skip the member only. Each sample is webdataset's dict:
    ``__key__``, ``__url__`` and one bytes value per extension (``jpg``, ``txt``, ``json``, …).
    """
    try:
        stream = open(path, "rb")
    except OSError:
        skipped["unreadable_shard"] += 1
        return
    members = 0
    shard_failed = False

    def handler(err: Exception) -> bool:
        nonlocal shard_failed
        if isinstance(err, tarfile.TarError) or isinstance(err, EOFError):
            # The stream is broken from here on: count the shard once, whatever webdataset retries.
            if not shard_failed:
                shard_failed = True
                text = str(err.args[0] if err.args else err).lower()
                truncated = members > 0 or any(m in text for m in _TRUNCATION)
                skipped["truncated_shard" if truncated else "corrupt_shard"] += 1
            return True
        skipped["bad_tar_member"] += 1
        return True

    def counted(files: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        nonlocal members
        for f in files:
            members += bool(f)
            yield f

    with stream:
        files = tar_file_expander([{"url": path, "stream": stream}], handler=handler)
        yield from group_by_keys(counted(files), handler=handler)


def shuffle_buffer(samples: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Seeded shuffle with a bounded buffer (webdataset's ``shuffle`` with our own generator); size ≤ 1: as is."""
    if size <= 1:
        yield from samples
        return
    buf: list[Any] = []
    for sample in samples:
        if len(buf) < size:
            buf.append(sample)
            continue
        j = int(rng.integers(len(buf)))
        buf[j], sample = sample, buf[j]
        yield sample
    order = rng.permutation(len(buf))
    for j in order:
        yield buf[j]


# --------------------------------------------------------------------------------------------------
# The split, resumable iterator
# --------------------------------------------------------------------------------------------------


@dataclass
class Cursor:
    """Where a reader stands (module docstring)."""

    epoch: int = 0
    shard_index: int = 0  # position in this reader's shard list of that epoch
    sample_offset: int = 0  # samples of that shard already handed out

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def check_readers(n_shards: int, dp_size: int, num_workers: int) -> None:
    """Every reader (data-parallel rank × loader worker) needs at least one shard of its own."""
    if n_shards < dp_size * num_workers:
        raise ShardError(
            f"{n_shards} shards cannot feed {dp_size} data-parallel ranks × {num_workers} loader workers "
            f"= {dp_size * num_workers} readers: each needs at least one shard; write smaller shards "
            f"or lower data.num_workers"
        )


def assign_shards(
    n_shards: int, epoch: int, seed: int, dp_rank: int = 0, dp_size: int = 1, worker_id: int = 0, num_workers: int = 1
) -> list[int]:
    """Indices of the shards reader (dp_rank, worker_id) reads in ``epoch``, in reading order."""
    perm = np.random.default_rng([seed, SHARD_ORDER, epoch]).permutation(n_shards)  # same on every rank
    return [int(i) for i in perm[dp_rank::dp_size][worker_id::num_workers]]


def augment_rng(seed: int, epoch: int, shard: int, index: int) -> np.random.Generator:
    """The generator of one sample's augmentation: a function of its identity, not of who reads it."""
    return np.random.default_rng([seed, AUGMENT, epoch, shard, index])


class ShardReader:
    """The samples of this reader's shards, epoch after epoch, with a resumable :class:`Cursor`.

    Yields webdataset sample dicts with three fields added: ``__shard__`` (index in the full shard list),
    ``__index__`` (position in the tar, before shuffling) and ``__epoch__``. When a sample is handed out the
    cursor already counts it, so ``state_dict()`` taken after processing it resumes at the next one.
    """

    def __init__(
        self,
        shards: list[str],
        *,
        seed: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
        worker_id: int = 0,
        num_workers: int = 1,
        shuffle: int = 0,
        loop: bool = True,
        skipped: Counter | None = None,
        read: Callable[[str, Counter], Iterator[dict[str, Any]]] = read_shard,
    ) -> None:
        if not shards:
            raise ShardError("no shards to read")
        if not (0 <= dp_rank < dp_size and 0 <= worker_id < num_workers):
            raise ValueError(f"reader (dp_rank={dp_rank}/{dp_size}, worker={worker_id}/{num_workers}) out of range")
        check_readers(len(shards), dp_size, num_workers)
        self.shards, self.seed, self.shuffle, self.loop = shards, seed, shuffle, loop
        self.dp_rank, self.dp_size, self.worker_id, self.num_workers = dp_rank, dp_size, worker_id, num_workers
        self.skipped = skipped if skipped is not None else Counter()
        self.cursor = Cursor()
        self._read = read

    def assigned(self, epoch: int) -> list[int]:
        return assign_shards(
            len(self.shards), epoch, self.seed, self.dp_rank, self.dp_size, self.worker_id, self.num_workers
        )

    def _shard_samples(self, epoch: int, shard: int, counter: Counter) -> Iterator[dict[str, Any]]:
        def tagged() -> Iterator[dict[str, Any]]:
            for index, sample in enumerate(self._read(self.shards[shard], counter)):
                sample.update(__shard__=shard, __index__=index, __epoch__=epoch)
                yield sample

        rng = np.random.default_rng([self.seed, WITHIN_SHARD, epoch, shard])
        return shuffle_buffer(tagged(), self.shuffle, rng)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        c = self.cursor
        while True:
            order = self.assigned(c.epoch)
            fresh, handed_out = c.shard_index == 0 and c.sample_offset == 0, 0
            while c.shard_index < len(order):
                handed_out += yield from self._continue_shard(order[c.shard_index])
                c.shard_index, c.sample_offset = c.shard_index + 1, 0
            if fresh and handed_out == 0 and self.loop:  # streaming forever on nothing would hang training
                raise RuntimeError(
                    f"reader {self.worker_id}/{self.num_workers} of rank {self.dp_rank}/{self.dp_size} read a whole "
                    f"epoch of {len(order)} shard(s) without one sample (skipped: {dict(self.skipped)}); "
                    f"check the shards with: dalle-dist data check SHARDS --stage dvae"
                )
            if not self.loop:
                return
            c.epoch, c.shard_index, c.sample_offset = c.epoch + 1, 0, 0

    def _continue_shard(self, shard: int) -> Iterator[dict[str, Any]]:
        """Hand out the samples of ``shard`` from the cursor's offset on; returns how many were handed out.

        Errors are attributed to the position being pulled when they occur; positions before the offset were
        counted by the run that saved the cursor, so their errors are dropped here and nothing counts twice.
        """
        c = self.cursor
        skip, live, n = c.sample_offset, Counter(), 0
        samples = self._shard_samples(c.epoch, shard, live)
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                self.skipped.update(live)  # errors after the last sample (a truncated tail); n >= skip here
                return max(0, n - skip)
            if n >= skip:
                self.skipped.update(live)
            live.clear()
            if n >= skip:
                c.sample_offset = n + 1
                yield sample
            n += 1

    def state_dict(self) -> dict[str, int]:
        return self.cursor.as_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.cursor = Cursor(int(state["epoch"]), int(state["shard_index"]), int(state["sample_offset"]))
