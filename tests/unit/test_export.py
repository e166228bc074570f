"""Export: engine step directories (any topology) and old one-process checkpoint.pt files → one safetensors file
that generation loads, no pickle."""

import json

import pytest
import torch
from _legacy import legacy_prior_checkpoint
from safetensors.torch import load_file

from dalle_dist.config import build_config
from dalle_dist.files import load_checkpoint
from dalle_dist.sample.generate import generate_images
from dalle_dist.train.export import export, load_export
from dalle_dist.train.stages import DVAETrainer, PriorTrainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    common = {"train.steps": "3", "train.progress": "false"}
    PriorTrainer(build_config("prior", ["configs/prior/tiny.yaml"], {**common, "train.out_dir": str(root / "p")})).fit()
    DVAETrainer(build_config("dvae", ["configs/dvae/tiny.yaml"], {**common, "train.out_dir": str(root / "d")})).fit()
    legacy_prior_checkpoint(root / "old" / "checkpoint.pt")
    return root


def test_export_round_trip_uses_ema_and_generates(runs, tmp_path):
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    out = export(tmp_path / "e", runs / "old" / "checkpoint.pt", runs / "d" / "checkpoint.pt", tok)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    tensors = load_file(str(out / "model.safetensors"))
    state = load_checkpoint(runs / "old" / "checkpoint.pt")  # old one-process checkpoints still export
    for k, v in state["ema"]["shadow"].items():
        torch.testing.assert_close(tensors[f"prior.{k}"], v)
    assert not torch.equal(tensors["prior.head.text_unembed.weight"], state["model"]["head.text_unembed.weight"])
    engine = load_file(str(export(tmp_path / "e2", runs / "p", runs / "d" / "checkpoint.pt") / "model.safetensors"))
    raw = load_file(str(export(tmp_path / "e3", runs / "p", use_ema=False) / "model.safetensors"))
    assert {k for k in engine if k.startswith("prior.")} == raw.keys()
    assert not torch.equal(engine["prior.head.ln_f.weight"], raw["prior.head.ln_f.weight"])  # EMA vs raw

    prior, dvae, config = load_export(out)
    assert config["prior"]["model"]["flavor"] == "tiny" and dvae is not None
    text = torch.zeros(2, prior.cfg.caption_len, dtype=torch.long)
    text[:, :5] = torch.randint(1, 200, (2, 5))
    codes = generate_images(prior, text, temperature=0.0)
    images = dvae.decode_codes(codes.view(2, prior.cfg.grid, prior.cfg.grid))
    assert images.shape == (2, 3, 64, 64) and 0 <= images.min() and images.max() <= 1


def test_export_raw_weights_and_cli(runs, tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "dalle_dist", "export", "--prior", str(runs / "p"), "--out", str(tmp_path), "--no-ema"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"] == ["config.json", "model.safetensors"]
    tensors = load_file(str(tmp_path / "model.safetensors"))
    from dalle_dist.train.export import read_prior_weights

    for k, v in read_prior_weights(runs / "p", use_ema=False)[0].items():
        torch.testing.assert_close(tensors[f"prior.{k}"], v)


def test_load_export_refuses_non_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="dalle-dist export"):
        load_export(tmp_path)
