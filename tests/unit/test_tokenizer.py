"""The caption BPE tokenizer: training, lowercase, pad id 0, dropout only in training mode, truncation, the CLI."""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from dalle_dist.data.shapes import generate_sample, write_shapes
from dalle_dist.data.tokenizer import BPETokenizer, cli_train, load_tokenizer, save_tokenizer, train_bpe

LONG = "a picture of a large yellow triangle to the left of a small magenta diamond"


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return [generate_sample(0, i).caption for i in range(300)]


@pytest.fixture(scope="module")
def trained(captions: list[str]) -> Tokenizer:
    t0 = time.monotonic()
    tok = train_bpe(captions, vocab_size=300)
    assert time.monotonic() - t0 < 5.0
    return tok


def test_train_small_vocab_with_pad_at_zero(trained: Tokenizer) -> None:
    assert trained.get_vocab_size() <= 300
    assert trained.token_to_id("<pad>") == 0
    assert BPETokenizer(trained).vocab_size == trained.get_vocab_size()
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["a b"], vocab_size=100)  # below the byte alphabet + <pad>


def test_round_trip_and_lowercase(trained: Tokenizer, captions: list[str]) -> None:
    bpe = BPETokenizer(trained)
    for c in captions[:50] + ["Ünïcode café ✓ (never seen) 123"]:
        assert bpe.decode(bpe.encode(c, 256)) == c.lower()
    assert bpe.encode("A Big RED Circle", 64) == bpe.encode("a big red circle", 64)
    assert bpe.decode(bpe.encode("  A Red Circle  ", 64)) == "a red circle"  # surrounding whitespace stripped
    # Merges learned from the captions: fewer tokens than bytes (with vocab 300 only 43 merges exist).
    assert len(bpe.encode("a circle of a circle", 64)) == 5


def test_pad_id_never_produced_for_text(trained: Tokenizer, captions: list[str]) -> None:
    bpe = BPETokenizer(trained, dropout=0.5).train_mode(True)
    for c in captions + ["<pad>", "a <pad> red circle", ""]:
        assert 0 not in bpe.encode(c, 256)
    assert bpe.decode(bpe.encode("a <pad> red circle", 256)) == "a <pad> red circle"  # literal text, not padding
    assert bpe.pad_id == 0


def test_dropout_on_varies_and_differs_from_eval(trained: Tokenizer) -> None:
    bpe = BPETokenizer(trained, dropout=0.1)
    eval_ids = bpe.encode(LONG, 256)
    bpe.train_mode(True)
    assert bpe.training and bpe.dropout == 0.1
    draws = [tuple(bpe.encode(LONG, 256)) for _ in range(50)]
    assert len(set(draws)) > 1, "BPE dropout never changed the encoding"
    assert any(list(d) != eval_ids for d in draws)
    assert all(len(d) >= len(eval_ids) for d in draws)  # dropping merges only splits tokens
    assert {bpe.decode(d) for d in draws} == {LONG}  # every segmentation spells the same text
    # Back to eval: deterministic again and equal to a fresh tokenizer's encoding.
    bpe.train_mode(False)
    assert [bpe.encode(LONG, 256) for _ in range(10)] == [eval_ids] * 10
    assert BPETokenizer(Tokenizer.from_str(trained.to_str())).encode(LONG, 256) == eval_ids


def test_dropout_zero_in_training_mode_is_deterministic(trained: Tokenizer) -> None:
    eval_ids = BPETokenizer(trained).encode(LONG, 256)
    bpe = BPETokenizer(trained, dropout=0.0).train_mode(True)
    assert [bpe.encode(LONG, 256) for _ in range(20)] == [eval_ids] * 20
    with pytest.raises(ValueError):
        bpe.dropout = 1.0


def test_truncation_is_counted(trained: Tokenizer) -> None:
    bpe = BPETokenizer(trained)
    full = bpe.encode(LONG, 256)
    assert (bpe.encoded, bpe.truncated) == (1, 0)
    assert bpe.encode(LONG, 4) == full[:4]
    assert bpe.encode("a", 4) == bpe.encode("a", 256)
    assert (bpe.encoded, bpe.truncated) == (4, 1)
    with pytest.raises(ValueError, match="max_len"):
        bpe.encode(LONG, 0)


def test_save_load_identical(trained: Tokenizer, captions: list[str], tmp_path: Path) -> None:
    bpe = BPETokenizer(trained, dropout=0.1).train_mode(True)  # saving in training mode must not save dropout
    path = str(tmp_path / "tok.json")
    bpe.save(path)
    assert json.loads(Path(path).read_text())["model"]["dropout"] is None
    loaded = load_tokenizer(path)
    ref = BPETokenizer(trained)
    assert loaded.vocab_size == ref.vocab_size and not loaded.training
    assert [loaded.encode(c, 256) for c in captions] == [ref.encode(c, 256) for c in captions]
    assert Tokenizer.from_file(path).encode(LONG).ids == ref.encode(LONG, 256)  # plain library JSON
    save_tokenizer(trained, str(tmp_path / "sub" / "tok2.json"))
    assert load_tokenizer(str(tmp_path / "sub" / "tok2.json"), dropout=0.1).dropout == 0.1
    with pytest.raises(FileNotFoundError, match="tokenizer train"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_pickles_for_dataloader_workers(trained: Tokenizer) -> None:
    bpe = BPETokenizer(trained, dropout=0.1).train_mode(True)
    bpe.encode(LONG, 4)
    clone = pickle.loads(pickle.dumps(bpe))
    assert clone.training and clone.dropout == 0.1 and clone.truncated == 1
    assert clone.train_mode(False).encode(LONG, 256) == BPETokenizer(trained).encode(LONG, 256)


def test_cli_train_on_shapes_shard(tmp_path: Path) -> None:
    write_shapes(str(tmp_path / "data"), n=120, shard_size=60)
    out = tmp_path / "tok.json"
    shards = str(tmp_path / "data" / "train-{000000..000001}.tar")
    cmd = [sys.executable, "-m", "dalle_dist", "tokenizer", "train", "--shards", shards, "--out", str(out)]
    proc = subprocess.run(
        cmd + ["--vocab-size", "400", "--max-tokens", "6"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["captions"] == 120 and summary["shards"] == 2 and summary["pad_id"] == 0
    assert 257 < summary["vocab_size"] <= 400
    assert 0 < summary["truncated"] <= 120  # captions longer than 6 tokens were counted
    bpe = load_tokenizer(str(out))
    assert bpe.decode(bpe.encode("A small red circle", 32)) == "a small red circle"


def test_cli_train_missing_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(
        shards=str(tmp_path / "nope-{0..1}.tar"), out=str(tmp_path / "x.json"), vocab_size=300, min_frequency=2
    )
    assert cli_train(args) == 2
    assert "2 shard(s) not found" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
