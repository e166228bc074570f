"""The contrastive reranker [P §2.6]: it learns the shapes set, saves without pickle, masks duplicate captions,
and the open_clip alternative fails clearly."""

import json
import sys
import types

import numpy as np
import pytest
import torch

from dalle_dist.cli import main
from dalle_dist.data.shapes import generate_sample, write_shapes
from dalle_dist.data.tokenizer import iter_captions, save_tokenizer, train_bpe
from dalle_dist.rerank.clip import load_open_clip
from dalle_dist.rerank.loss import clip_loss, retrieval_metrics, same_caption
from dalle_dist.rerank.model import ContrastiveReranker, RerankerConfig
from dalle_dist.rerank.negatives import add_mirrored, swap_words, swapped_captions
from dalle_dist.rerank.scorer import load_scorer, rank
from dalle_dist.rerank.train import load_reranker, save_reranker


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(str(root / "data"), n=800, shard_size=400)
    tok = root / "tok.json"
    save_tokenizer(train_bpe(iter_captions([str(root / "data" / "train-000000.tar")]), vocab_size=400), str(tok))
    return root / "data", tok


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    data, tok = shapes
    out = tmp_path_factory.mktemp("reranker") / "r"
    args = ["train-reranker", "--shards", str(data), "--tokenizer", str(tok), "--out", str(out), "--steps", "60",
            "--batch-size", "64", "--lr", "3e-3", "--holdout-every", "8", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    return out


def test_training_lowers_the_loss_and_writes_a_self_contained_dir(trained):
    doc = json.loads((trained / "reranker.json").read_text())
    assert doc["tokenizer"] == {"kind": "bpe", "file": "tokenizer.json"}
    assert (trained / "tokenizer.json").is_file() and (trained / "reranker.safetensors").is_file()
    metrics = doc["metrics"]
    assert metrics["loss"] < 0.6 * metrics["first_loss"]
    assert metrics["heldout"]["n"] >= 50 and metrics["heldout"]["pair_acc"] > 0.7  # chance: 0.5


def test_trained_model_prefers_the_true_caption_on_unseen_images(trained):
    model, _ = load_reranker(trained)
    samples = [generate_sample(0, i) for i in range(10_000, 10_064)]  # indices past the 800 trained on
    images = np.stack([s.image for s in samples])  # (64, 64, 64, 3) uint8, channels last
    captions = [s.caption for s in samples]
    others = captions[1:] + captions[:1]  # another sample's caption
    keep = [i for i in range(len(samples)) if not same_caption([captions[i]], [others[i]]).item()]
    true = model.score(images[keep], [captions[i] for i in keep])
    wrong = model.score(images[keep], [others[i] for i in keep])
    assert (true > wrong).float().mean() > 0.75  # chance: 0.5


def test_save_load_round_trip_gives_identical_scores(tmp_path, shapes):
    _, tok = shapes
    from dalle_dist.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(tok))
    model = ContrastiveReranker(RerankerConfig(vocab_size=tokenizer.vocab_size), tokenizer)
    save_reranker(model, tmp_path / "r", tok)
    loaded, _ = load_reranker(tmp_path / "r")
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    captions = ["a red circle", "a big blue square on the left", "", "a cross", "a yellow diamond above a cross"]
    assert torch.equal(model.score(images, captions), loaded.score(images, captions))
    nhwc = images.permute(0, 2, 3, 1).numpy()
    assert torch.equal(loaded.score(nhwc, captions), loaded.score(images, captions))  # either layout
    big = torch.nn.functional.interpolate(images.float(), scale_factor=2).round().byte()  # other sizes resize
    assert loaded.score(big, captions).shape == (5,)
    with pytest.raises(FileNotFoundError, match="train-reranker"):
        load_reranker(tmp_path / "missing")


def test_duplicate_captions_are_masked_not_pushed_apart():
    captions = ["a small red circle", "A small  red circle", "a blue square"]
    assert same_caption(captions).tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    # A perfect model: each image on its caption's direction; the two equal captions share one text embedding.
    txt = torch.eye(3)[[0, 0, 1]]  # (3, 3)
    img = txt.clone()
    masked = clip_loss(img, txt, torch.tensor(50.0), captions)
    assert masked < 1e-3  # the duplicate is no negative, so nothing is left to learn
    naive = clip_loss(img, txt, torch.tensor(50.0), ["x", "y", "z"])  # what unmasked InfoNCE would say
    assert naive > 0.4  # ≈ (2/3)·log 2: it would push a red circle away from "a small red circle"
    # A text-only negative equal to an image's own caption is masked for that image.
    neg = torch.eye(3)[[0]]  # (1, 3): the embedding of "a small red circle"
    assert clip_loss(img, txt, torch.tensor(50.0), captions, neg, ["a small red circle"]) < 1e-3


def test_retrieval_counts_an_equal_caption_as_right():
    torch.manual_seed(0)
    model = ContrastiveReranker(RerankerConfig())
    images = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)  # identical images: any retrieval is a tie
    metrics = retrieval_metrics(model, images, ["a red circle", "a red circle"])
    assert metrics["top1"] == 1.0


def test_spatial_hard_negatives():
    assert swap_words("a red circle to the left of a blue cross", "h") == "a red circle to the right of a blue cross"
    assert swap_words("a cross under a square at the top", "v") == "a cross above a square at the bottom"
    assert swap_words("a bright square", "h") == "a bright square"  # whole words only
    assert swapped_captions(["a cross on the top left", "a red circle"]) == [
        "a cross on the top right",
        "a cross on the bottom left",
    ]
    images = torch.arange(2 * 3 * 2 * 4, dtype=torch.uint8).view(2, 3, 2, 4)  # (2, 3, H=2, W=4)
    out, caps = add_mirrored(images, ["a circle on the left", "a circle"])
    assert caps == ["a circle on the left", "a circle", "a circle on the right"]
    assert out.shape == (3, 3, 2, 4) and torch.equal(out[2], images[0].flip(-1))


def test_rank_is_descending_and_stable():
    assert rank(torch.tensor([0.1, 0.5, 0.1, 0.9])).tolist() == [2, 1, 3, 0]


def test_open_clip_missing_file_names_the_path(tmp_path, monkeypatch):
    missing = tmp_path / "no_such_clip.pt"
    monkeypatch.setitem(sys.modules, "open_clip", None)  # the file is checked before the import
    with pytest.raises(FileNotFoundError, match="no_such_clip.pt"):
        load_open_clip(missing)
    with pytest.raises(FileNotFoundError, match="no_such_clip.pt"):
        load_scorer(clip=missing)
    (tmp_path / "clip.pt").write_bytes(b"weights")
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        load_open_clip(tmp_path / "clip.pt")
    with pytest.raises(ValueError, match="not both"):
        load_scorer(clip=tmp_path / "clip.pt", reranker=tmp_path)
    with pytest.raises(FileNotFoundError, match="--reranker DIR"):
        load_scorer(default_dir=tmp_path / "export" / "reranker")


def test_open_clip_scorer_uses_normalised_features(tmp_path, monkeypatch):
    """A stand-in open_clip module: the checkpoint path reaches create_model_and_transforms, scores are cosines."""
    seen = {}

    class Model(torch.nn.Module):
        def encode_image(self, x):  # (N, 3, H, W) → (N, 2): mean red, mean green
            return x[:, :2].mean((2, 3)) * 7

        def encode_text(self, ids):  # (N, 1) → (N, 2): "red" → (1, 0), else (0, 1)
            return torch.stack([ids[:, 0].float(), 1 - ids[:, 0].float()], 1) * 3

    def create(arch, pretrained, device):
        seen.update(arch=arch, pretrained=pretrained)
        return Model(), None, lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255

    fake = types.SimpleNamespace(
        create_model_and_transforms=create,
        get_tokenizer=lambda arch: lambda caps: torch.tensor([[int("red" in c)] for c in caps]),
    )
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    (tmp_path / "clip.bin").write_bytes(b"w")
    scorer = load_open_clip(tmp_path / "clip.bin", "RN50")
    assert seen == {"arch": "RN50", "pretrained": str(tmp_path / "clip.bin")}
    images = np.zeros((2, 8, 8, 3), np.uint8)
    images[0, ..., 0] = 255  # red
    images[1, ..., 1] = 255  # green
    scores = scorer.score(images, ["a red square"])
    assert torch.allclose(scores, torch.tensor([1.0, 0.0]), atol=1e-6)
