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


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory):
    """An untrained reranker (byte tokenizer): ranking must follow its scores whatever they are."""
    import torch

    from dalle_dist.rerank.model import ContrastiveReranker, RerankerConfig
    from dalle_dist.rerank.train import save_reranker

    torch.manual_seed(0)
    return save_reranker(ContrastiveReranker(RerankerConfig()), tmp_path_factory.mktemp("rr") / "reranker")


def test_rerank_keeps_the_best_k_per_caption(exported, reranker_dir, tmp_path, capsys):
    args = ["generate", "--checkpoint", str(exported), "--text", "a red circle", "--text", "a blue square",
            "--n", "3", "--rerank", "2", "--reranker", str(reranker_dir), "--out", str(tmp_path / "r")]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["images"] == 6 and summary["rerank"] == 2 and summary["grid_all"] == "grid_all.png"
    index = json.loads((tmp_path / "r" / "index.json").read_text())
    assert all((tmp_path / "r" / e["file"]).is_file() for e in index)  # all N still written
    for caption in ("a red circle", "a blue square"):
        rows = [e for e in index if e["caption"] == caption]
        assert sorted(e["rank"] for e in rows) == [0, 1, 2]
        by_rank = sorted(rows, key=lambda e: e["rank"])
        assert [e["score"] for e in by_rank] == sorted((e["score"] for e in rows), reverse=True)
        assert [e["selected"] for e in by_rank] == [True, True, False]
    assert Image.open(tmp_path / "r" / "grid.png").size == (2 * 66 - 2, 2 * 66 - 2)  # K per caption
    assert Image.open(tmp_path / "r" / "grid_all.png").size == (3 * 66 - 2, 2 * 66 - 2)  # all N
    # grid.png's first tile is the best sample of the first caption.
    best = next(e for e in index if e["caption"] == "a red circle" and e["rank"] == 0)
    tile = np.asarray(Image.open(tmp_path / "r" / "grid.png"))[:64, :64]
    assert np.array_equal(tile, np.asarray(Image.open(tmp_path / "r" / best["file"])))


def test_rerank_defaults_to_the_exported_reranker_and_explains_errors(exported, reranker_dir, tmp_path):
    base = ["generate", "--text", "a red circle", "--n", "2"]
    with pytest.raises(SystemExit, match="1 <= K <= 2"):
        main([*base, "--checkpoint", str(exported), "--rerank", "3", "--reranker", str(reranker_dir),
              "--out", str(tmp_path / "a")])  # fmt: skip
    with pytest.raises(SystemExit, match="--reranker DIR"):  # the plain export has no reranker/
        main([*base, "--checkpoint", str(exported), "--rerank", "1", "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="no_clip.pt"):
        main([*base, "--checkpoint", str(exported), "--rerank", "1", "--clip", str(tmp_path / "no_clip.pt"),
              "--out", str(tmp_path / "c")])  # fmt: skip
    with pytest.raises(SystemExit, match="add --rerank"):
        main([*base, "--checkpoint", str(exported), "--reranker", str(reranker_dir), "--out", str(tmp_path / "d")])
    root = exported.parent
    with_rr = export(root / "e_rr", root / "p", root / "d" / "checkpoint.pt", reranker=reranker_dir)
    assert (with_rr / "reranker" / "reranker.json").is_file()
    assert main([*base, "--checkpoint", str(with_rr), "--rerank", "1", "--out", str(tmp_path / "e")]) == 0
    index = json.loads((tmp_path / "e" / "index.json").read_text())
    assert [e["selected"] for e in sorted(index, key=lambda e: e["rank"])] == [True, False]
    with pytest.raises(FileNotFoundError, match="not a reranker"):
        export(root / "e_bad", root / "p", reranker=tmp_path)
