"""``dalle-dist pretokenize`` round trip (codes = encode_codes of the same view, uint16, every sample once over
two processes) and the prior trainer on token shards (exact resume, grid check, truncation counts)."""

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from _shardmaker import key_of, make_image_shards, one_torch_thread, write_tar  # noqa: F401  (autouse fixture)

from dalle_dist.config import build_config
from dalle_dist.data.decode import decode_image
from dalle_dist.data.pipeline import CODES_EXTENSION, load_codes
from dalle_dist.data.preprocess import centre_crop_resize
from dalle_dist.data.pretokenize import cli_pretokenize
from dalle_dist.data.shards import expand_shards, read_shard
from dalle_dist.models.loading import load_dvae
from dalle_dist.train.stages import DVAETrainer, PriorTrainer

COUNTS = [4, 3, 5]


@pytest.fixture(scope="module")
def dvae_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dvae")
    over = {"train.out_dir": str(out), "train.progress": "false", "train.steps": "1", "data.batch_size": "2"}
    DVAETrainer(build_config("dvae", ["configs/dvae/tiny.yaml"], over)).fit()
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("images")
    paths = make_image_shards(root, len(COUNTS), COUNTS, h=70, w=84, fmt="jpg")
    paths.append(write_tar(root / "extra.tar", [{"__key__": "broken", "jpg": b"garbage", "txt": "a broken image"}]))
    return paths


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, dvae_ckpt, image_shards) -> Path:
    out = tmp_path_factory.mktemp("tokens")
    args = argparse.Namespace(
        shards=",".join(image_shards), dvae=str(dvae_ckpt), out=str(out), procs=2, shard_size=4, batch_size=3,
        device="cpu",
    )  # fmt: skip
    assert cli_pretokenize(args) == 0
    return out


def read_tokens(out: Path) -> dict[str, dict]:
    samples: dict[str, dict] = {}
    for path in expand_shards(str(out)):
        for raw in read_shard(path, Counter()):
            assert raw["__key__"] not in samples, "a sample was written twice"
            samples[raw["__key__"]] = raw
    return samples


def test_pretokenize_writes_every_sample_once_over_two_processes(tokens, image_shards):
    manifest = json.loads((tokens / "manifest.json").read_text())
    names = sorted(p.name for p in tokens.glob("*.tar"))
    assert manifest["shards"] == names and {n[:4] for n in names} == {"p000", "p001"}
    assert manifest["samples"] == sum(COUNTS) and manifest["skipped"] == {"corrupt_image": 1}
    assert (manifest["grid"], manifest["vocab_size"], manifest["dtype"]) == (8, 512, "uint16")
    samples = read_tokens(tokens)
    assert set(samples) == {key_of(s, i) for s, n in enumerate(COUNTS) for i in range(n)}
    meta = json.loads(samples[key_of(2, 1)]["json"])
    assert meta["source_shard"] == image_shards[2] and meta["source_key"] == key_of(2, 1) and meta["grid"] == 8


def test_pretokenized_codes_equal_encode_codes_of_the_centre_view(tokens, image_shards, dvae_ckpt):
    dvae = load_dvae(str(dvae_ckpt))
    samples = read_tokens(tokens)
    for path in image_shards[:2]:
        for raw in read_shard(path, Counter()):
            view = centre_crop_resize(decode_image(raw["jpg"]), 64)  # (64, 64, 3) uint8
            x = torch.from_numpy(view).permute(2, 0, 1)[None].float() / 255.0  # (1, 3, 64, 64)
            with torch.no_grad():
                expected = dvae.encode_codes(x)[0].numpy()  # (8, 8)
            codes = load_codes(samples[raw["__key__"]][CODES_EXTENSION])
            assert codes.dtype == np.uint16 and codes.shape == (8, 8)
            np.testing.assert_array_equal(codes, expected)
            assert samples[raw["__key__"]]["txt"] == raw["txt"]


def test_pretokenize_refuses_a_used_output_dir(tokens, image_shards, dvae_ckpt, capsys):
    args = argparse.Namespace(
        shards=image_shards[0], dvae=str(dvae_ckpt), out=str(tokens), procs=1, shard_size=4, batch_size=2, device="cpu"
    )
    assert cli_pretokenize(args) == 2 and "already holds" in capsys.readouterr().err


def prior_cfg(out: Path, tokens: Path, steps: int, **extra):
    over = {
        "train.out_dir": str(out),
        "train.progress": "false",
        "train.log_every": "1",
        "train.steps": str(steps),
        "data.source": "tokens",
        "data.shards": str(tokens),
        "data.batch_size": "3",
        "data.shuffle_buffer": "2",
        **extra,
    }
    return build_config("prior", ["configs/prior/tiny.yaml"], over)


def test_prior_trainer_resume_on_token_shards_reproduces_uninterrupted_run(tmp_path, tokens):
    batch4 = {"data.batch_size": "4"}
    full = [h["loss"] for h in PriorTrainer(prior_cfg(tmp_path / "full", tokens, 4, **batch4)).fit()]  # 16 > 12
    first = [h["loss"] for h in PriorTrainer(prior_cfg(tmp_path / "part", tokens, 2, **batch4)).fit()]
    rest = [h["loss"] for h in PriorTrainer(prior_cfg(tmp_path / "part", tokens, 4, **batch4)).fit()]
    assert first + rest == full
    cursor = ("checkpoints", "step_00000004", "data_dp0of1.pt")  # the one dp rank's cursor file
    a = torch.load(tmp_path.joinpath("full", *cursor), weights_only=True)
    assert a == torch.load(tmp_path.joinpath("part", *cursor), weights_only=True)
    assert a["cursors"][0]["epoch"] == 1


def test_prior_counts_truncated_captions_and_checks_the_grid(tmp_path, tokens):
    trainer = PriorTrainer(prior_cfg(tmp_path, tokens, 1, **{"model.text_len": "10"})).build()  # 8 caption slots
    batch = trainer.data.loader.next_batch()
    assert batch["text"].shape == (3, 8) and batch["image"].shape == (3, 64) and batch["image"].max() < 512
    assert trainer.data.loader.counted["caption_truncated"] == 3  # "a picture number …" is longer than 8 bytes
    with pytest.raises(ValueError, match="--model.grid 8"):
        PriorTrainer(prior_cfg(tmp_path, tokens, 1, **{"model.grid": "4"})).build()


def test_prior_uses_the_bpe_tokenizer_when_given(tmp_path, tokens):
    tok_mod = pytest.importorskip("dalle_dist.data.tokenizer")
    if not hasattr(tok_mod, "train_bpe") or not hasattr(tok_mod, "save_tokenizer"):
        pytest.skip("BPE tokenizer not available yet")
    captions = [raw["txt"].decode() for raw in read_tokens(tokens).values()]
    path = tmp_path / "bpe.json"
    tok_mod.save_tokenizer(tok_mod.train_bpe(captions * 5, vocab_size=300, min_frequency=1), str(path))
    trainer = PriorTrainer(prior_cfg(tmp_path, tokens, 1, **{"data.tokenizer": str(path)})).build()
    batch = trainer.data.loader.next_batch()
    ids = batch["text"][0][batch["text"][0] != 0].tolist()
    assert tok_mod.load_tokenizer(str(path)).decode(ids) == batch["captions"][0]


def test_data_check_reads_token_shards(tokens):
    from dalle_dist.data.check import check_shards

    report = check_shards(expand_shards(str(tokens)), "prior", 64)
    assert report["yielded"] == sum(COUNTS) and report["skipped"] == {}
    long = sum(len(f"a picture number {i} from shard {s}") > 30 for s, n in enumerate(COUNTS) for i in range(n))
    assert report["counted"] == {"caption_truncated": long}  # byte captions over the default 30 caption slots
