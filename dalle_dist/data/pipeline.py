"""The training input pipeline: shards → decode → filters → augment → batches, with a resumable cursor.

One code path serves the trainers, ``dalle-dist data check`` and ``dalle-dist pretokenize``:

- :class:`ImageProcessor` turns one raw image-shard sample into an :class:`ImageSample` (Listing 1 for the
  dVAE, Listing 2 for the prior, the deterministic centre view for pretokenizing) or counts why not;
- :class:`TokenProcessor` does the same for token shards (caption ids + dVAE codes), counting captions
  truncated to the text length as ``caption_truncated`` (kept, not skipped);
- :class:`BatchStream` is a torch ``IterableDataset``: one :class:`~.shards.ShardReader` per loader worker,
  each batch tagged with the worker's cursor and the skip counts since the previous batch;
- :class:`ShardLoader` is what a trainer holds: ``next_batch()``, ``state_dict()`` / ``load_state_dict()``
  and the running ``skipped`` / ``counted`` counters.

Worker design (docs/data.md). Reader w of W owns a disjoint shard subset (``shards.assign_shards``) and builds
whole batches, so every batch comes from one reader and carries that reader's cursor. The main process keeps
the last cursor of each reader plus which reader comes next. torch's DataLoader serves an IterableDataset's
workers strictly round robin, so on resume worker i is given reader (next + i) mod W: the batch order continues
exactly. With ``num_workers = 0`` the same stream runs in the main process as reader 0 of 1.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..config import ConfigError, DataConfig
from .decode import ImageLimits, Skip, decode_caption, decode_meta, image_bytes, open_image, to_rgb_array, too_small
from .preprocess import (
    AUGMENTS,
    aspect_ratio_ok,
    caption_too_short,
    centre_crop_resize,
    load_filter,
    parse_filter_specs,
)
from .shards import Cursor, ShardError, ShardReader, augment_rng, check_readers, expand_shards
from .text import pad_batch

log = logging.getLogger(__name__)

CODES_EXTENSION = "codes.npy"  # token shards: KEY.codes.npy (uint16, (grid, grid)) + KEY.txt + KEY.json


class Tokenizer(Protocol):
    """What the prior needs of a caption tokenizer (ByteTokenizer, the BPE tokenizer)."""

    def encode(self, caption: str, max_len: int) -> list[int]: ...


@dataclass
class ImageSample:
    image: np.ndarray  # (R, R, 3) uint8
    caption: str
    key: str
    shard: int  # index in the expanded shard list
    meta: dict[str, Any]  # the sample's json plus width / height of the source image


@dataclass
class TokenSample:
    text: list[int]  # caption ids, at most caption_len
    codes: np.ndarray  # (grid, grid) uint16
    caption: str
    key: str


# --------------------------------------------------------------------------------------------------
# Per-sample processing
# --------------------------------------------------------------------------------------------------


class _Filters:
    """Caption filters shared by both processors: too few words, then the configured plugins in order."""

    def __init__(self, data: DataConfig) -> None:
        self.min_words = data.min_caption_words
        self.specs = parse_filter_specs(data.filters)
        self.plugins = [load_filter(s) for s in self.specs]  # fail fast on a bad import path

    def reason(self, caption: str, meta: dict[str, Any]) -> str | None:
        if caption_too_short(caption, self.min_words):
            return "caption_too_short"
        for spec, fn in zip(self.specs, self.plugins):
            try:
                reason = fn(caption, meta)
            except Exception as err:  # a plugin must never stop training; count and move on
                log.warning("filter %s failed on %r: %s", spec, meta.get("key"), err)
                return "filter_error"
            if reason:
                return str(reason)
        return None


class _Processor:
    """Raw sample → processed sample, or None with the skip reason counted; never raises on data."""

    def _process(self, raw: dict[str, Any], counted: Counter) -> Any:
        raise NotImplementedError

    def __call__(self, raw: dict[str, Any], skipped: Counter, counted: Counter) -> Any:
        try:
            out = self._process(raw, counted)
        except Exception as err:  # the safety net: training never crashes on data
            log.warning("unexpected error on sample %r: %r", raw.get("__key__"), err)
            out = Skip("unexpected_error")
        if isinstance(out, Skip):
            skipped[out.reason] += 1
            return None
        return out


class ImageProcessor(_Processor):
    """Raw image-shard sample → :class:`ImageSample` at side ``resolution``, or a counted skip.

    ``mode``: "dvae" (Listing 1), "prior" (Listing 2) or "centre" (deterministic centre crop, pretokenize).
    Cheap checks run first: caption, then the image header (pixel budget, size, aspect ratio), then the plugin
    filters, and only then are pixels decoded.
    """

    def __init__(self, mode: str, resolution: int, data: DataConfig) -> None:
        if mode not in (*AUGMENTS, "centre"):
            raise ValueError(f"mode {mode!r}: choose one of {[*AUGMENTS, 'centre']}")
        self.mode, self.resolution, self.seed = mode, resolution, data.seed
        self.max_caption_chars = data.max_caption_chars
        self.max_aspect_ratio = data.max_aspect_ratio
        min_side = data.min_image_side or max(1, resolution // 2)
        self.limits = ImageLimits(max_pixels=data.max_image_pixels, min_side=min_side)
        self.filters = _Filters(data)

    def _process(self, raw: dict[str, Any], counted: Counter) -> ImageSample | Skip:
        caption = decode_caption(raw, self.max_caption_chars)
        if isinstance(caption, Skip):
            return caption
        data = image_bytes(raw)
        if isinstance(data, Skip):
            return data
        im = open_image(data, self.limits)
        if isinstance(im, Skip):
            return im
        w, h = im.size
        if not aspect_ratio_ok(w, h, self.max_aspect_ratio):
            return Skip("aspect_ratio")
        if too_small(w, h, self.limits):
            return Skip("image_too_small")
        key = str(raw.get("__key__", ""))
        meta = {**decode_meta(raw), "key": key, "url": raw.get("__url__", ""), "width": w, "height": h}
        reason = self.filters.reason(caption, meta)
        if reason:
            return Skip(reason)
        rgb = to_rgb_array(im)
        if isinstance(rgb, Skip):
            return rgb
        if min(rgb.shape[:2]) < self.resolution:
            counted["image_upscaled"] += 1  # s < R: the listings' exception (preprocess module docstring)
        if self.mode == "centre":
            image = centre_crop_resize(rgb, self.resolution)
        else:
            rng = augment_rng(
                self.seed, int(raw.get("__epoch__", 0)), int(raw.get("__shard__", 0)), int(raw.get("__index__", 0))
            )
            image = AUGMENTS[self.mode](rgb, self.resolution, rng)
        return ImageSample(image, caption, key, int(raw.get("__shard__", 0)), meta)


def load_codes(data: bytes) -> np.ndarray:
    """A ``KEY.codes.npy`` member → its array (no pickles)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


class TokenProcessor(_Processor):
    """Raw token-shard sample → :class:`TokenSample` (caption ids, dVAE codes), or a counted skip."""

    def __init__(self, data: DataConfig, tokenizer: Tokenizer, caption_len: int, grid: int, image_vocab: int) -> None:
        self.tokenizer, self.caption_len, self.grid, self.image_vocab = tokenizer, caption_len, grid, image_vocab
        self.max_caption_chars = data.max_caption_chars
        self.filters = _Filters(data)

    def _process(self, raw: dict[str, Any], counted: Counter) -> TokenSample | Skip:
        caption = decode_caption(raw, self.max_caption_chars)
        if isinstance(caption, Skip):
            return caption
        if raw.get(CODES_EXTENSION) is None:
            return Skip("missing_codes")
        try:
            codes = load_codes(raw[CODES_EXTENSION])
        except (ValueError, OSError, EOFError):
            return Skip("bad_codes")
        if codes.shape != (self.grid, self.grid):
            return Skip("codes_grid_mismatch")
        if codes.dtype != np.uint16 or int(codes.max(initial=0)) >= self.image_vocab:
            return Skip("bad_codes")
        key = str(raw.get("__key__", ""))
        reason = self.filters.reason(caption, {**decode_meta(raw), "key": key, "url": raw.get("__url__", "")})
        if reason:
            return Skip(reason)
        # Encode one id past the limit to learn whether the caption was cut [P §2.2: at most 256 tokens].
        ids = list(self.tokenizer.encode(caption, self.caption_len + 1))
        if len(ids) > self.caption_len:
            counted["caption_truncated"] += 1
            ids = ids[: self.caption_len]
        return TokenSample(ids, codes, caption, key)


Processor = Callable[[dict[str, Any], Counter, Counter], Any]


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


def collate_images(items: list[ImageSample]) -> dict[str, Any]:
    images = torch.from_numpy(np.stack([s.image for s in items]))  # (B, R, R, 3) uint8
    return {
        "images": images.permute(0, 3, 1, 2).contiguous(),  # (B, 3, R, R) uint8
        "captions": [s.caption for s in items],
        "keys": [s.key for s in items],
    }


class TokenCollate:
    """Token samples → {"text": (B, caption_len) long, right-padded with pad_id; "image": (B, grid²) long}."""

    def __init__(self, caption_len: int, pad_id: int = 0) -> None:
        self.caption_len, self.pad_id = caption_len, pad_id

    def __call__(self, items: list[TokenSample]) -> dict[str, Any]:
        codes = torch.from_numpy(np.stack([s.codes.astype(np.int64) for s in items]))  # (B, g, g)
        return {
            "text": pad_batch([s.text for s in items], self.caption_len, self.pad_id),  # (B, Lc)
            "image": codes.flatten(1),  # (B, g²)
            "captions": [s.caption for s in items],
            "keys": [s.key for s in items],
        }


class BatchStream(torch.utils.data.IterableDataset):
    """Batches from one reader per loader worker (module docstring); each item is a dict with the batch, the
    reader's id and cursor after the batch, and the counts since the previous batch."""

    def __init__(
        self,
        reader_args: dict[str, Any],
        processor: Processor,
        collate: Callable[[list[Any]], Any],
        batch_size: int,
        start: list[dict[str, int]] | None = None,
        rotation: int = 0,
    ) -> None:
        """``reader_args``: the :class:`~.shards.ShardReader` arguments every reader of the rank shares (shards,
        seed, shuffle, dp_rank, dp_size, and num_workers: the number of readers); each reader adds its worker_id."""
        super().__init__()
        self.reader_args, self.processor, self.collate, self.batch_size = reader_args, processor, collate, batch_size
        self.num_readers = int(reader_args["num_workers"])
        self.start, self.rotation = start, rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        reader_id = (self.rotation + physical) % self.num_readers
        skipped, counted, total = Counter(), Counter(), Counter()
        reader = ShardReader(**self.reader_args, worker_id=reader_id, skipped=skipped)
        if self.start is not None:
            reader.load_state_dict(self.start[reader_id])
        items: list[Any] = []
        failing_since: int | None = None  # epoch of the first skip after the last kept sample
        for raw in reader:
            item = self.processor(raw, skipped, counted)
            if item is None:
                epoch = int(raw["__epoch__"])
                failing_since = epoch if failing_since is None else failing_since
                if epoch - failing_since >= 2:  # a whole epoch went by without one usable sample
                    total.update(skipped)
                    raise RuntimeError(
                        f"every sample of a whole epoch was skipped (reader {reader_id}; skipped: {dict(total)}); "
                        "run dalle-dist data check SHARDS --stage STAGE to see why"
                    )
                continue
            failing_since = None
            items.append(item)
            if len(items) == self.batch_size:
                total.update(skipped)
                yield {
                    "batch": self.collate(items),
                    "reader": reader_id,
                    "cursor": reader.state_dict(),
                    "skipped": dict(skipped),
                    "counted": dict(counted),
                }
                items = []
                skipped.clear()
                counted.clear()


class ShardLoader:
    """Batches from shards for one data-parallel rank, with an exact resume cursor.

    ``state_dict()`` holds every reader's cursor, which reader serves next and the running counts; it is plain
    ints and dicts (safe for ``torch.load(weights_only=True)``).
    """

    def __init__(
        self,
        shards: list[str],
        processor: Processor,
        collate: Callable[[list[Any]], Any],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: int = 0,
        num_workers: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        self.num_workers = num_workers
        self.num_readers = max(1, num_workers)
        reader_args = dict(shards=shards, seed=seed, shuffle=shuffle, num_workers=self.num_readers)
        reader_args.update(dp_rank=dp_rank, dp_size=dp_size)
        # Construct one reader now so a bad split fails at build time with its message, not in a worker.
        ShardReader(**reader_args, worker_id=0)
        self._stream_args = (reader_args, processor, collate, batch_size)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.cursors = [Cursor().as_dict() for _ in range(self.num_readers)]
        self.next_reader = 0
        self.skipped: Counter = Counter()
        self.counted: Counter = Counter()
        self._it: Iterator[dict[str, Any]] | None = None

    @classmethod
    def from_config(
        cls, data: DataConfig, processor: Processor, collate: Callable[[list[Any]], Any], dp_rank: int, dp_size: int
    ) -> ShardLoader:
        """A loader of ``data.shards`` with ``data``'s batch size, seed, shuffle buffer and worker count."""
        return cls(
            expand_shards(data.shards),
            processor,
            collate,
            data.batch_size,
            seed=data.seed,
            shuffle=data.shuffle_buffer,
            num_workers=data.num_workers,
            dp_rank=dp_rank,
            dp_size=dp_size,
        )

    def _start(self) -> Iterator[dict[str, Any]]:
        stream = BatchStream(*self._stream_args, start=[dict(c) for c in self.cursors], rotation=self.next_reader)
        if self.num_workers == 0:
            return iter(stream)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.num_workers, prefetch_factor=2)
        return iter(loader)

    def next_batch(self) -> dict[str, Any]:
        if self._it is None:
            self._it = self._start()
        out = next(self._it)
        reader = int(out["reader"])
        self.cursors[reader] = {k: int(v) for k, v in out["cursor"].items()}
        self.next_reader = (reader + 1) % self.num_readers
        self.skipped.update(out["skipped"])
        self.counted.update(out["counted"])
        return out["batch"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "num_readers": self.num_readers,
            "cursors": [dict(c) for c in self.cursors],
            "next_reader": self.next_reader,
            "skipped": dict(sorted(self.skipped.items())),
            "counted": dict(sorted(self.counted.items())),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_readers"]) != self.num_readers or int(state["dp_size"]) != self.dp_size:
            raise ValueError(
                f"the data cursor was saved with {state['num_readers']} reader(s) per rank and {state['dp_size']} "
                f"data-parallel rank(s); this run has {self.num_readers} and {self.dp_size}. Resume with the same "
                f"--data.num_workers ({max(0, int(state['num_readers']))} or 0 when it was 1) and topology, or "
                "start the data over with --train.resume false"
            )
        if int(state["dp_rank"]) != self.dp_rank:
            raise ValueError(f"data cursor of rank {state['dp_rank']} given to rank {self.dp_rank}")
        self.cursors = [{k: int(v) for k, v in c.items()} for c in state["cursors"]]
        self.next_reader = int(state["next_reader"])
        self.skipped = Counter(state.get("skipped", {}))
        self.counted = Counter(state.get("counted", {}))
        self._it = None  # restart the stream (and any workers) from the loaded cursors


# --------------------------------------------------------------------------------------------------
# Builders used by the trainers
# --------------------------------------------------------------------------------------------------


def image_loader(stage: str, resolution: int, data: DataConfig, dp_rank: int = 0, dp_size: int = 1) -> ShardLoader:
    """Image batches ``{"images": (B, 3, R, R) uint8, "captions", "keys"}`` with Listing 1 or 2 by ``stage``."""
    return ShardLoader.from_config(data, ImageProcessor(stage, resolution, data), collate_images, dp_rank, dp_size)


def token_loader(
    data: DataConfig,
    tokenizer: Tokenizer,
    caption_len: int,
    grid: int,
    image_vocab: int,
    pad_id: int = 0,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> ShardLoader:
    """Token batches ``{"text": (B, caption_len), "image": (B, grid²), "captions", "keys"}`` from token shards."""
    processor = TokenProcessor(data, tokenizer, caption_len, grid, image_vocab)
    return ShardLoader.from_config(data, processor, TokenCollate(caption_len, pad_id), dp_rank, dp_size)


def check_shard_config(data: DataConfig, dp_size: int) -> None:
    """Before any process group starts: ``data.shards`` expands to files that feed every reader of ``dp_size``
    data-parallel ranks × ``data.num_workers`` loader workers; else a ``ConfigError`` that names the fix."""
    try:
        check_readers(len(expand_shards(data.shards)), dp_size, max(1, data.num_workers))
    except ShardError as err:
        raise ConfigError(f"data.shards: {err}") from None
