"""`dalle-dist generate` on an export: one PNG per sample, a grid with a row per caption, priming accepted."""

import json

import numpy as np
import pytest
from PIL import Image

from dalle_dist.cli import main
from dalle_dist.config import build_config
from dalle_dist.train.export import export
from dalle_dist.train.stages import DVAETrainer, PriorTrainer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    common = {"train.steps": "2", "train.progress": "false"}
    PriorTrainer(build_config("prior", ["configs/prior/tiny.yaml"], {**common, "train.out_dir": str(root / "p")})).fit()
    DVAETrainer(build_config("dvae", ["configs/dvae/tiny.yaml"], {**common, "train.out_dir": str(root / "d")})).fit()
    return export(root / "e", root / "p", root / "d" / "checkpoint.pt")


def test_generate_writes_images_grid_and_index(exported, tmp_path, capsys):
    args = ["generate", "--checkpoint", str(exported), "--text", "a red circle", "--text", "a blue square",
            "--n", "3", "--batch-size", "2", "--out", str(tmp_path / "a")]  # fmt: skip
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["images"] == 6
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert [r["caption"] for r in index] == ["a red circle"] * 3 + ["a blue square"] * 3
    assert Image.open(tmp_path / "a" / index[0]["file"]).size == (64, 64)
    assert Image.open(tmp_path / "a" / "grid.png").size == (3 * 66 - 2, 2 * 66 - 2)


def test_greedy_is_deterministic_and_priming_runs(exported, tmp_path):
    base = ["generate", "--checkpoint", str(exported), "--text", "a red circle", "--n", "2", "--temperature", "0"]
    assert main([*base, "--out", str(tmp_path / "x")]) == 0
    assert main([*base, "--out", str(tmp_path / "y")]) == 0
    a = np.asarray(Image.open(tmp_path / "x" / "grid.png"))
    assert np.array_equal(a, np.asarray(Image.open(tmp_path / "y" / "grid.png")))
    prime = ["--prime", str(tmp_path / "x" / "caption00_000.png"), "--prime-rows", "2"]
    assert main([*base, *prime, "--out", str(tmp_path / "z")]) == 0
    with pytest.raises(SystemExit, match="prime-rows"):
        main([*base, "--prime", str(tmp_path / "x" / "caption00_000.png"), "--out", str(tmp_path / "w")])
