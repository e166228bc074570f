"""Caption → token ids: the byte tokenizer and the trainers' choice between it and the BPE.

``ByteTokenizer`` is the dependency-free stand-in the foundation trainers use: lowercase UTF-8 bytes,
id = byte + 1, so id 0 stays free as the pad id (``PriorModelConfig.text_pad_id``). The paper's 16,384-token
BPE with 10% dropout [P §2.2] is trained with HF ``tokenizers`` by the data pipeline (``dalle-dist tokenizer
train``); both expose ``encode(caption, max_len) -> list[int]`` and ``vocab_size``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import DataConfig


class ByteTokenizer:
    """Lowercased UTF-8 bytes shifted by one (0 is padding); vocab 257."""

    vocab_size = 257
    pad_id = 0

    def encode(self, caption: str, max_len: int) -> list[int]:
        ids = [b + 1 for b in caption.lower().encode("utf-8")]
        return ids[:max_len]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 1 for i in ids if 0 < i < 257).decode("utf-8", errors="replace")


def pad_batch(rows: list[list[int]], length: int, pad_id: int = 0) -> torch.Tensor:
    """Right-pad token rows into a (B, length) LongTensor; rows longer than ``length`` are truncated."""
    out = torch.full((len(rows), length), pad_id, dtype=torch.long)  # (B, L)
    for i, row in enumerate(rows):
        row = row[:length]
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def build_tokenizer(data: DataConfig, text_vocab: int, training: bool = True) -> Any:
    """The caption tokenizer: the BPE JSON at ``data.tokenizer`` (dropout while training [P §2.2]) or bytes."""
    if data.tokenizer:
        from .tokenizer import load_tokenizer  # imported lazily: HF tokenizers only when used

        tokenizer = load_tokenizer(data.tokenizer, data.bpe_dropout)
        if training and hasattr(tokenizer, "train_mode"):
            tokenizer.train_mode(True)
    else:
        tokenizer = ByteTokenizer()
    if tokenizer.vocab_size > text_vocab:
        raise ValueError(
            f"model.text_vocab={text_vocab} < the tokenizer's {tokenizer.vocab_size} ids: "
            f"set --model.text_vocab {tokenizer.vocab_size}"
        )
    return tokenizer
