"""Both trainers in one process (the 1-rank job of the engine): loss falls on a tiny fixed batch, checkpoints
round-trip exactly, metrics logged."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_dist.config import ConfigError, build_config
from dalle_dist.files import load_checkpoint
from dalle_dist.models.loading import load_dvae
from dalle_dist.train.export import read_prior_weights
from dalle_dist.train.stages import DVAETrainer, PriorTrainer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def make_folder(root: Path, n: int = 4, size: int = 80) -> Path:
    """n images (a coloured square on grey) with captions, plus one corrupt image and one without caption."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, rgb) in enumerate(list(COLOURS.items())[:n]):
        arr = np.full((size, size + 16, 3), 128, np.uint8)
        arr[10 + 5 * i : 50 + 5 * i, 20:60] = rgb
        Image.fromarray(arr).save(root / f"{i:04d}.png")
        (root / f"{i:04d}.txt").write_text(f"a {name} square")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "broken.txt").write_text("broken")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "nocaption.png")
    return root


def dvae_cfg(out: Path, **over):
    o = {"train.out_dir": str(out), "train.progress": "false", "train.log_every": "1", **over}
    return build_config("dvae", ["configs/dvae/tiny.yaml"], o)


def prior_cfg(out: Path, **over):
    o = {"train.out_dir": str(out), "train.progress": "false", "train.log_every": "1", **over}
    return build_config("prior", ["configs/prior/tiny.yaml"], o)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def dvae_ckpt(tmp_path_factory, folder) -> Path:
    out = tmp_path_factory.mktemp("dvae")
    cfg = dvae_cfg(out, **{"data.source": "folder", "data.path": str(folder), "data.batch_size": "4"})
    cfg.train.steps = 2
    DVAETrainer(cfg).fit()
    return out / "checkpoint.pt"


def test_dvae_loss_falls_on_fixed_batch(tmp_path, folder):
    # Batch size = folder size: every step sees the same 4 images (in a shuffled order).
    cfg = dvae_cfg(tmp_path, **{"data.source": "folder", "data.path": str(folder), "data.batch_size": "4"})
    cfg.train.steps = 40
    hist = DVAETrainer(cfg).fit()
    first, last = np.mean([h["loss"] for h in hist[:3]]), np.mean([h["loss"] for h in hist[-3:]])
    assert last < 0.8 * first, (first, last)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 40 and {"loss", "nll", "kl", "lr", "temperature", "kl_weight"} <= set(json.loads(lines[-1]))


def test_prior_loss_falls_on_fixed_batch(tmp_path, folder, dvae_ckpt):
    over = {
        "data.source": "folder",
        "data.path": str(folder),
        "data.batch_size": "4",
        "data.dvae_checkpoint": str(dvae_ckpt),
    }
    cfg = prior_cfg(tmp_path, **over)
    cfg.train.steps = 40
    hist = PriorTrainer(cfg).fit()
    first, last = np.mean([h["loss"] for h in hist[:3]]), np.mean([h["loss"] for h in hist[-3:]])
    assert last < 0.7 * first, (first, last)
    assert {"loss_text", "loss_image"} <= set(hist[-1])


def test_folder_skips_and_counts_bad_files(folder):
    from dalle_dist.data.folder import read_folder

    pairs = read_folder(folder, 64)
    assert pairs.images.shape == (4, 3, 64, 64) and pairs.images.dtype == torch.uint8
    assert pairs.skipped == {"unreadable_image": 1, "missing_caption": 1}


@pytest.mark.parametrize("stage", ["dvae", "prior"])
def test_checkpoint_resume_reproduces_uninterrupted_run(tmp_path, stage, folder, dvae_ckpt):
    make = dvae_cfg if stage == "dvae" else prior_cfg
    Trainer = DVAETrainer if stage == "dvae" else PriorTrainer
    over = {"data.source": "folder", "data.path": str(folder), "data.batch_size": "3"}
    if stage == "prior":
        over["data.dvae_checkpoint"] = str(dvae_ckpt)
    full_cfg = make(tmp_path / "full", **over)
    full_cfg.train.steps = 6
    full = [h["loss"] for h in Trainer(full_cfg).fit()]

    part_cfg = make(tmp_path / "part", **over)
    part_cfg.train.steps = 3
    first = [h["loss"] for h in Trainer(part_cfg).fit()]
    part_cfg.train.steps = 6
    resumed_trainer = Trainer(part_cfg)
    rest = [h["loss"] for h in resumed_trainer.fit()]  # resumes from part's checkpoint at step 3
    assert resumed_trainer.step_num == 6
    assert first + rest == full  # bit-exact on CPU: model, optimizer, EMA, schedules, data cursor, RNG

    if stage == "dvae":
        a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
        b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
        pairs = [(a["model"], b["model"]), (a["ema"]["shadow"], b["ema"]["shadow"])]
    else:
        pairs = [(read_prior_weights(tmp_path / r, use_ema=e)[0] for r in ("full", "part")) for e in (False, True)]
        step6 = ("checkpoints", "step_00000006", "trainer.pt")
        a, b = (torch.load(tmp_path.joinpath(r, *step6), weights_only=True) for r in ("full", "part"))
        assert a["schedule"] == b["schedule"] and a["ema_calls"] == b["ema_calls"] == 6
    for x, y in pairs:
        x, y = dict(x), dict(y)
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)
    assert a["data"] == b["data"]


def test_random_source_resume_and_state_contents(tmp_path):
    cfg = prior_cfg(tmp_path)
    cfg.train.steps = 2
    t = PriorTrainer(cfg)
    t.fit()
    step = tmp_path / "checkpoints" / "step_00000002"  # one process writes the layout every topology writes
    state = torch.load(step / "trainer.pt", weights_only=True)
    assert state["step"] == 2 and state["stage"] == "prior" and state["topology"] == "pp=1,replicate=1,shard=1"
    assert {"schedule", "config", "precision", "ema_calls", "data"} <= set(state)
    assert (step / "rng_0.pt").is_file()
    from torch.distributed.checkpoint import FileSystemReader

    keys = set(FileSystemReader(str(step)).read_metadata().state_dict_metadata)
    assert "model.resblocks.0.attn.q_proj.weight" in keys and "ema.resblocks.0.attn.q_proj.weight" in keys
    assert "optim.state.resblocks.0.attn.q_proj.weight.exp_avg" in keys, "Adam moments must be saved"


def test_old_one_process_checkpoint_is_refused_with_the_conversion(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"")  # what the one-process trainer of earlier versions wrote
    with pytest.raises(ConfigError, match="convert-checkpoint"):
        PriorTrainer(prior_cfg(tmp_path)).fit()


def test_corrupt_or_wrong_checkpoint_is_refused(tmp_path, dvae_ckpt):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(dvae_ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(bad)
    with pytest.raises(ValueError, match="not a prior checkpoint"):
        PriorTrainer(prior_cfg(tmp_path / "x")).build().load(dvae_ckpt)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt")


def test_load_dvae_uses_ema_weights(dvae_ckpt):
    state = load_checkpoint(dvae_ckpt)
    model = load_dvae(str(dvae_ckpt))
    for k, v in state["ema"]["shadow"].items():
        torch.testing.assert_close(model.state_dict()[k], v)
    codes = model.encode_codes(torch.rand(2, 3, 64, 64))
    assert codes.shape == (2, 8, 8) and codes.max() < 512


def test_prior_refuses_mismatched_dvae(tmp_path, folder, dvae_ckpt):
    over = {
        "data.source": "folder",
        "data.path": str(folder),
        "data.dvae_checkpoint": str(dvae_ckpt),
        "model.grid": "4",
    }
    with pytest.raises(ValueError, match="--model.grid 8"):
        PriorTrainer(prior_cfg(tmp_path, **over)).build()


def test_old_checkpoint_converts_and_resumes_like_an_unbroken_run(tmp_path):
    """An earlier version's one-process checkpoint.pt → checkpoints/step_3 → the engine resumes it to step 6 and
    follows the engine's own 6-step run (the old trainer's AdamW32 loop and torch's foreach AdamW round apart)."""
    from _legacy import legacy_prior_checkpoint

    from dalle_dist.train.convert import convert_checkpoint

    old, _ = legacy_prior_checkpoint(tmp_path / "old" / "checkpoint.pt", steps=3)
    step_dir = convert_checkpoint(old)
    assert step_dir == tmp_path / "old" / "checkpoints" / "step_00000003"
    resumed = PriorTrainer(prior_cfg(tmp_path / "old", **{"train.steps": "6"}))
    rest = [h["loss"] for h in resumed.fit()]
    full = [h["loss"] for h in PriorTrainer(prior_cfg(tmp_path / "new", **{"train.steps": "6"})).fit()]
    assert resumed.step_num == 6 and len(rest) == 3
    assert rest == pytest.approx(full[3:], rel=1e-5)
    assert resumed.ema.calls == 6
