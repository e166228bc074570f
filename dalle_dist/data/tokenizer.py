"""The caption BPE tokenizer [P §2.2]: training on shard captions, saving, and the prior's encode wrapper.

The paper lowercases captions and BPE-encodes them into at most 256 tokens from a 16,384-token vocabulary,
with 10% BPE dropout (Provilkov et al. 2020) on the training captions [P §2.2 fn 5, B.2]. The tokenizer itself
was never released (byte-level or not is UNVERIFIED), so the choices here are ours (docs/synthetic.md):

- **Normalizer**: NFKC, then lowercase [P §2.2], then strip surrounding whitespace. NFKC folds compatibility
  forms (full-width letters, ligatures) so that one word has one spelling; accents are kept, the byte-level
  alphabet encodes them anyway.
- **Pre-tokenizer**: GPT-2 style byte-level with a prefix space. Every caption is encodable (no ``<unk>``),
  and a word gets the same tokens at the start of a caption as in the middle.
- **Special tokens**: only ``<pad>``, at id 0 = ``PriorModelConfig.text_pad_id``. The prior uses it for "no
  token here" (its per-position pad embedding [P §2.2]), so real text must never produce it: the wrapper encodes
  a literal "<pad>" in a caption as ordinary bytes (``encode_special_tokens``).
- **Dropout** lives on the BPE model (``tokenizer.model.dropout``), which tokenizers lets us set at runtime.
  The saved JSON has none (deterministic); :class:`BPETokenizer` switches it on only in training mode.
  The dropout draws come from the library's Rust thread RNG and cannot be seeded from Python.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD_TOKEN = "<pad>"
PAD_ID = 0  # must equal PriorModelConfig.text_pad_id


def build_untrained() -> Tokenizer:
    """An empty BPE tokenizer with the normalizer, pre-tokenizer and decoder described in the module docstring."""
    # ignore_merges=False: with True, a whole word found in the vocabulary skips the merge loop and therefore
    # skips dropout too, which would make dropout a no-op on frequent words.
    tok = Tokenizer(models.BPE(ignore_merges=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(
    captions: Iterable[str], vocab_size: int = 16384, min_frequency: int = 2, show_progress: bool = False
) -> Tokenizer:
    """Train a lowercase byte-level BPE on ``captions``; ``<pad>`` gets id 0.

    ``vocab_size`` counts the 256 byte symbols and ``<pad>``; training stops earlier when no pair occurs
    ``min_frequency`` times (small caption sets), so check ``get_vocab_size()`` of the result.
    """
    base = len(pre_tokenizers.ByteLevel.alphabet()) + 1
    if vocab_size < base:
        raise ValueError(f"vocab_size={vocab_size} is below the {base} ids the byte alphabet and <pad> need")
    tok = build_untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD_TOKEN],  # first special token → id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is ever unknown
        show_progress=show_progress,
    )
    tok.train_from_iterator(captions, trainer)
    if tok.token_to_id(PAD_TOKEN) != PAD_ID:
        raise RuntimeError(f"{PAD_TOKEN} got id {tok.token_to_id(PAD_TOKEN)}, expected {PAD_ID}")
    return tok


class BPETokenizer:
    """Caption → ids for the prior: ``encode(caption, max_len)``, BPE dropout only in training mode.

    Counters ``encoded`` and ``truncated`` are per process (each DataLoader worker keeps its own copy).
    """

    pad_id = PAD_ID

    def __init__(self, tokenizer: Tokenizer, dropout: float = 0.0) -> None:
        if tokenizer.token_to_id(PAD_TOKEN) != PAD_ID:
            raise ValueError(f"tokenizer has no {PAD_TOKEN} at id {PAD_ID}; train it with dalle-dist tokenizer train")
        self._tok = tokenizer
        # A literal "<pad>" inside a caption is text, not padding: encode it as bytes.
        self._tok.encode_special_tokens = True
        self._dropout = 0.0
        self._training = False
        self.encoded = 0
        self.truncated = 0
        self.dropout = dropout

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def dropout(self) -> float:
        """BPE dropout probability used in training mode (the paper: 0.1 [P §2.2 fn 5])."""
        return self._dropout

    @dropout.setter
    def dropout(self, p: float) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"BPE dropout must lie in [0, 1), got {p}")
        self._dropout = float(p)
        self._apply()

    @property
    def training(self) -> bool:
        return self._training

    def train_mode(self, enabled: bool = True) -> BPETokenizer:
        """Training mode applies BPE dropout; eval mode (the default) is deterministic."""
        self._training = bool(enabled)
        self._apply()
        return self

    def _apply(self) -> None:
        p = self._dropout if self._training else 0.0
        # None, not 0.0, when off: the library then takes its deterministic, cached path.
        self._tok.model.dropout = p if p > 0 else None

    def encode(self, caption: str, max_len: int) -> list[int]:
        """Token ids of ``caption`` (lowercased), at most ``max_len``; never contains ``pad_id``."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        ids = self._tok.encode(caption, add_special_tokens=False).ids
        self.encoded += 1
        if len(ids) > max_len:
            self.truncated += 1
            ids = ids[:max_len]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; pad ids are skipped and the prefix space the pre-tokenizer added is removed."""
        text = self._tok.decode([int(i) for i in ids if int(i) != PAD_ID], skip_special_tokens=True)
        return text[1:] if text.startswith(" ") else text

    def save(self, path: str) -> None:
        save_tokenizer(self._tok, path)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "json": _deterministic_json(self._tok),
            "dropout": self._dropout,
            "training": self._training,
            "encoded": self.encoded,
            "truncated": self.truncated,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(Tokenizer.from_str(state["json"]), dropout=state["dropout"])  # type: ignore[misc]
        self.train_mode(state["training"])
        self.encoded, self.truncated = state["encoded"], state["truncated"]


def _deterministic_json(tok: Tokenizer) -> str:
    """The library's JSON with dropout removed, so a plain ``Tokenizer.from_file`` is deterministic."""
    tree = json.loads(tok.to_str())
    tree["model"]["dropout"] = None
    return json.dumps(tree, ensure_ascii=False)


def save_tokenizer(tokenizer: Tokenizer | BPETokenizer, path: str) -> None:
    """Write the library's JSON (loadable with ``tokenizers.Tokenizer.from_file``), without dropout."""
    tok = tokenizer.tokenizer if isinstance(tokenizer, BPETokenizer) else tokenizer
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(_deterministic_json(tok))


def load_tokenizer(path: str, dropout: float = 0.0) -> BPETokenizer:
    """Load a saved tokenizer; ``dropout`` takes effect only after ``train_mode(True)``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {path!r} not found; train one with: dalle-dist tokenizer train ...")
    return BPETokenizer(Tokenizer.from_file(path), dropout=dropout)


# --------------------------------------------------------------------------------------------------
# Reading captions from shards and the CLI
# --------------------------------------------------------------------------------------------------


def expand_shards(spec: str) -> list[str]:
    """Comma-separated brace patterns → shard URLs, e.g. ``'d/{000..009}.tar,e/x.tar'``."""
    from braceexpand import braceexpand

    urls = [u for part in spec.split(",") if part.strip() for u in braceexpand(part.strip())]
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards")
    return urls


def check_local_shards(urls: list[str]) -> None:
    """Fail before reading anything when a local shard is missing (remote and ``pipe:`` URLs are not checked)."""
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found, first: {missing[0]!r}")


def iter_captions(urls: list[str]) -> Iterator[str]:
    """The ``.txt`` member of every sample, in shard order; only caption files are read out of the tars."""
    check_local_shards(urls)
    import webdataset as wds  # imports torch: seconds, so only once the shards are known to exist

    samples = wds.tarfile_samples(
        [{"url": u} for u in urls], handler=wds.warn_and_continue, select_files=lambda name: name.endswith(".txt")
    )
    for sample in samples:
        text = sample.get("txt")
        if text is not None:
            yield text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


class _Progress:
    """Counts captions as they stream into the trainer and prints a line to stderr every few seconds."""

    def __init__(self, captions: Iterable[str], every_s: float = 10.0) -> None:
        self.captions, self.every_s, self.n = captions, every_s, 0

    def __iter__(self) -> Iterator[str]:
        t0 = last = time.monotonic()
        for caption in self.captions:
            self.n += 1
            now = time.monotonic()
            if now - last >= self.every_s:
                print(f"tokenizer: read {self.n:,} captions ({self.n / (now - t0):,.0f}/s)", file=sys.stderr)
                last = now
            yield caption


def cli_train(args: argparse.Namespace) -> int:
    """``dalle-dist tokenizer train --shards SPEC --out tokenizer.json``: train, save, print a JSON summary."""
    t0 = time.monotonic()
    try:
        urls = expand_shards(args.shards)
        captions = _Progress(iter_captions(urls))
        # The library's own progress bars cover the merge phase; they are for terminals, not logs.
        show = sys.stderr.isatty()
        tok = train_bpe(captions, vocab_size=args.vocab_size, min_frequency=args.min_frequency, show_progress=show)
    except (FileNotFoundError, ValueError) as err:
        print(f"dalle-dist tokenizer train: {err}", file=sys.stderr)
        return 2
    if captions.n == 0:
        print(
            f"dalle-dist tokenizer train: no .txt captions in {len(urls)} shard(s) of {args.shards!r}", file=sys.stderr
        )
        return 2
    save_tokenizer(tok, args.out)
    summary: dict[str, Any] = {"out": args.out, "shards": len(urls), "captions": captions.n}
    summary.update(vocab_size=tok.get_vocab_size(), vocab_size_requested=args.vocab_size, pad_id=PAD_ID)
    summary["train_seconds"] = round(time.monotonic() - t0, 3)
    max_tokens = getattr(args, "max_tokens", 256)
    if max_tokens > 0:  # a second pass: how long encodings are, how many captions the prior would truncate
        bpe = BPETokenizer(tok)
        lengths = [len(bpe.encode(c, 1 << 30)) for c in iter_captions(urls)]
        summary.update(max_tokens=max_tokens, truncated=sum(n > max_tokens for n in lengths))
        summary.update(mean_tokens=round(sum(lengths) / len(lengths), 3), longest=max(lengths))
    summary["seconds"] = round(time.monotonic() - t0, 3)
    print(json.dumps(summary))
    return 0
