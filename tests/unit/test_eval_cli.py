"""``dalle-dist eval`` end to end on small synthetic sets, the judge's caption match, and FID's closed form on
Gaussians with full, non-commuting covariances.

The Inception file holds seeded random weights (tests/unit/test_inception.py). To keep the CLI runs fast on CPU
the network input is 75×75 (its smallest) instead of 299×299; the 299 path is tested in test_inception.py.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_inception import save_random_inception

from dalle_dist.cli import build_parser, main
from dalle_dist.data.shapes import generate_sample, write_shapes
from dalle_dist.eval import inception as inc
from dalle_dist.eval.cli import fid_of_features, fit_to, judge_captions
from dalle_dist.eval.fid import fid_from_features, frechet_distance

N = 4


def _write_dir(root: Path, samples: list, captions: list[str] | None) -> Path:
    root.mkdir(parents=True)
    index = []
    for i, s in enumerate(samples):
        name = f"caption00_{i:03d}.png"
        Image.fromarray(s.image).save(root / name)
        if captions is not None:  # extra keys, as a reranking colleague may add them, must be tolerated
            index.append({"caption": captions[i], "file": name, "score": 0.5, "rank": i, "selected": True})
    if captions is not None:
        (root / "index.json").write_text(json.dumps(index))
    Image.fromarray(np.full((100, 100, 3), 255, np.uint8)).save(root / "grid.png")  # never a sample
    return root


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eval")
    write_shapes(str(root / "shards"), n=N, shard_size=2)  # the same N samples as "gen", as tar shards
    truth = [generate_sample(0, i) for i in range(N)]
    other = [generate_sample(5, i, size=80) for i in range(N)]  # different scenes, resized to 64 on reading
    rotated = [s.caption for s in truth[1:] + truth[:1]]
    return {
        "gen": str(_write_dir(root / "gen", truth, [s.caption for s in truth])),
        "wrong": str(_write_dir(root / "wrong", truth, rotated)),
        "other": str(_write_dir(root / "other", other, None)),
        "shards": str(root / "shards" / "train-{000000..000001}.tar"),
        "weights": str(save_random_inception(root / inc.WEIGHTS_FILE)),
        "root": str(root),
    }


@pytest.fixture(autouse=True)
def small_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inc, "INPUT_SIZE", 75)


def _eval(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main(["eval", *argv, "--json", "--batch-size", "4", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_fid_of_a_set_against_itself_is_zero_at_every_blur_radius(sets, capsys, tmp_path):
    out = tmp_path / "res" / "eval.json"
    res = _eval(capsys, "--generated", sets["gen"], "--reference", sets["shards"], "--inception", sets["weights"],
                "--out", str(out))  # fmt: skip
    assert res["generated"] == {"path": sets["gen"], "n": N, "size": [64, 64]}  # grid.png is not a sample
    assert res["reference"]["n"] == N and res["reference"]["skipped"] == {}
    assert [row["blur"] for row in res["by_blur"]] == list(range(9))  # radii 0..8 [P Fig. 9]
    for row in res["by_blur"]:
        assert abs(row["fid"]) < 1e-3, row  # PNG and tar hold the same pixels
        assert row["is_mean"] >= 1.0 and row["is_std"] >= 0.0
    assert res["inception"]["is_splits"] == N // 2  # 10 splits asked, at most one per 2 images
    assert "judge" not in res
    assert json.loads(out.read_text()) == res


def test_fid_against_a_different_set_is_positive(sets, capsys):
    res = _eval(capsys, "--generated", sets["gen"], "--reference", sets["other"], "--inception", sets["weights"],
                "--blur", "0,2.5", "--judge")  # fmt: skip
    assert res["reference"]["n"] == N  # a directory of images without index.json; grid.png left out
    assert [row["blur"] for row in res["by_blur"]] == [0, 2.5]
    assert all(row["fid"] > 0.01 for row in res["by_blur"])
    assert res["judge"]["n"] == N


def test_judge_caption_match_without_inception(sets, capsys):
    right = _eval(capsys, "--generated", sets["gen"], "--judge")
    assert "by_blur" not in right and "reference" not in right
    j = right["judge"]
    assert j["n"] == N and j["errors"] == 0
    assert j["caption_match"] >= 0.99 and j["exact"] == 1.0  # the judge is exact on clean ground truth
    assert {"colour", "shape"} <= set(j["per_attribute"]) and j["per_attribute"]["colour"] == 1.0
    wrong = _eval(capsys, "--generated", sets["wrong"], "--judge")["judge"]
    assert wrong["caption_match"] < j["caption_match"] - 0.2


def test_judge_captions_counts_unjudgeable():
    img = generate_sample(0, 0).image
    res = judge_captions([img, img, img], [generate_sample(0, 0).caption, "a photo of a dog", None])
    assert res["n"] == 1 and res["errors"] == 2 and res["caption_match"] >= 0.99


def test_text_output_and_max_images(sets, capsys):
    argv = ["eval", "--generated", sets["gen"], "--reference", sets["shards"], "--inception", sets["weights"]]
    assert main([*argv, "--blur", "1", "--max-images", "2", "--device", "cpu", "--judge"]) == 0
    text = capsys.readouterr().out
    assert "generated:" in text and "(2 images" in text and "FID" in text and "caption match" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reference", "x"], "pt_inception-2015-12-05-6726825d.pth"),  # FID asked, no weights
        (["--judge", "--blur", "0,1"], "--inception"),  # blur radii are for FID/IS
        (["--inception", "{root}/absent.pth"], "nothing is downloaded"),
        (["--inception", "{weights}", "--reference", "{root}/no-{{0..1}}.tar"], "does not exist"),
        (["--inception", "{weights}", "--blur", "1,x"], "--blur"),
    ],
)
def test_errors_are_clear(sets, capsys, argv, message):
    argv = [a.format(**sets) for a in argv]
    assert main(["eval", "--generated", sets["gen"], *argv]) == 2
    assert message in capsys.readouterr().err


def test_judge_needs_captions(sets, capsys):
    assert main(["eval", "--generated", sets["other"], "--judge"]) == 2
    assert "index.json" in capsys.readouterr().err


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["eval", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for word in ("--generated", "--reference", "--inception", "--blur", "--judge", "--max-images", "pytorch-fid",
                 "never downloaded", "0,1,2,3,4,5,6,7,8"):  # fmt: skip
        assert word in text


def test_fit_to_crops_to_aspect_and_resizes():
    img = np.zeros((60, 120, 3), np.uint8)
    img[:, 30:90] = 200  # the centre square
    out = fit_to(img, 32, 32)
    assert out.shape == (32, 32, 3) and out.min() >= 190
    assert fit_to(img, 60, 120) is img


def test_frechet_distance_closed_form_non_commuting_2d():
    """For 2×2 matrices tr √M = √(tr M + 2 √det M) when M has non-negative eigenvalues, which Σ1Σ2 (similar to
    the PSD Σ1^½ Σ2 Σ1^½) does; so FID between 2-D Gaussians has a closed form for any covariances."""
    rng = np.random.default_rng(3)
    for _ in range(5):
        a, b = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
        s1, s2 = a @ a.T + 0.1 * np.eye(2), b @ b.T + 0.1 * np.eye(2)
        assert not np.allclose(s1 @ s2, s2 @ s1)
        mu1, mu2 = rng.normal(size=2), rng.normal(size=2)
        tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
        want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_fid_from_samples_of_correlated_gaussians_approaches_closed_form():
    rng = np.random.default_rng(4)
    s1 = np.array([[2.0, 1.2], [1.2, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    mu2 = np.array([1.0, -0.5])
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    want = mu2 @ mu2 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    x = rng.multivariate_normal(np.zeros(2), s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    assert fid_from_features(x, y) == pytest.approx(want, abs=0.03)


@pytest.mark.parametrize("n1, n2", [(5, 7), (12, 12), (30, 40)])
def test_small_sample_fid_equals_the_covariance_formula(n1, n2):
    """The n1×n2 cross-Gram route of the CLI gives fid.py's value, below and above the D² switch-over (D = 16)."""
    rng = np.random.default_rng(n1)
    a = rng.normal(size=(n1, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(loc=0.3, size=(n2, 16)) @ rng.normal(size=(16, 16))
    assert fid_of_features(a, b) == pytest.approx(fid_from_features(a, b), rel=1e-7)
    assert fid_of_features(a, a) == pytest.approx(0.0, abs=1e-9 * np.sum(a * a))


def test_selected_only_judges_the_reranked_samples(sets, capsys, tmp_path):
    """--selected-only keeps the index.json entries generate --rerank marked selected, and refuses a directory
    whose index has no such marks."""
    root = tmp_path / "mixed"
    shutil.copytree(sets["wrong"], root)
    index = json.loads((root / "index.json").read_text())
    truth = json.loads((Path(sets["gen"]) / "index.json").read_text())
    index[0]["caption"] = truth[0]["caption"]  # only sample 0 is captioned right
    for i, e in enumerate(index):
        e["selected"] = i == 0
    (root / "index.json").write_text(json.dumps(index))
    every = _eval(capsys, "--generated", str(root), "--judge")["judge"]
    kept = _eval(capsys, "--generated", str(root), "--judge", "--selected-only")["judge"]
    assert every["n"] == N and kept["n"] == 1
    assert kept["caption_match"] == 1.0 > every["caption_match"]
    for e in index:
        del e["selected"]
    (root / "index.json").write_text(json.dumps(index))
    assert main(["eval", "--generated", str(root), "--judge", "--selected-only"]) == 2
    assert "--rerank" in capsys.readouterr().err
