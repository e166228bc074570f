"""The FID Inception-v3: pytorch-fid's weight-file layout, strict loading, the missing-file error, features.

No real weights are available offline, so the network gets seeded random weights (He-normal convolutions, so that
activations keep their scale through 94 conv layers), saved to a temporary .pth and loaded back strictly.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dalle_dist.eval import inception as inc
from dalle_dist.eval.inception import FIDInceptionV3, features_and_logits, load_inception, preprocess

# Parameters of torchvision's Inception-v3 (27,161,264: 1000 classes, aux head) minus the aux head (3,326,696)
# plus the 8 extra classes of the TF graph's 1008-way fc (8·2048 + 8): the FID network of pytorch-fid.
FID_INCEPTION_PARAMS = 23_850_960
N_CONV_BN = 94  # stem 5 + A 3×7 + B 4 + C 4×10 + D 6 + E 2×9


def random_inception(seed: int = 0) -> FIDInceptionV3:
    """A FID Inception with seeded random weights whose activations neither vanish nor explode."""
    g = torch.Generator().manual_seed(seed)
    model = FIDInceptionV3()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0.0, m.in_features**-0.5, generator=g)
                m.bias.zero_()
    return model.eval()


def save_random_inception(path: Path, seed: int = 0) -> Path:
    torch.save(random_inception(seed).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_inception(tmp_path_factory.mktemp("inception") / inc.WEIGHTS_FILE)


def test_state_dict_layout_matches_pytorch_fid():
    model = FIDInceptionV3()
    sd = model.state_dict()
    expected_shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.weight": (32,),
        "Conv2d_1a_3x3.bn.running_var": (32,),
        "Conv2d_2a_3x3.conv.weight": (32, 32, 3, 3),
        "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
        "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
        "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5c.branch_pool.conv.weight": (64, 256, 1, 1),
        "Mixed_5d.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6a.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6b.branch7x7_3.conv.weight": (192, 128, 7, 1),
        "Mixed_6c.branch7x7dbl_1.conv.weight": (160, 768, 1, 1),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_6e.branch_pool.conv.weight": (192, 768, 1, 1),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
        "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
        "Mixed_7c.branch3x3_2a.conv.weight": (384, 384, 1, 3),
        "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch3x3dbl_2.conv.weight": (384, 448, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "Mixed_7c.branch_pool.bn.running_mean": (192,),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in sd)
    # Every conv+bn unit has conv.weight, bn.{weight,bias,running_mean,running_var,num_batches_tracked}; plus fc.
    assert sum(k.endswith(".conv.weight") for k in sd) == N_CONV_BN
    assert not any(k.endswith(".conv.bias") for k in sd)  # convolutions have no bias: the BN shift replaces it
    assert len(sd) == 6 * N_CONV_BN + 2
    assert sum(p.numel() for p in model.parameters()) == FID_INCEPTION_PARAMS
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_tf_pooling_quirks():
    model = FIDInceptionV3()
    # Average pools of the A/C/E blocks ignore padding: a constant map stays constant up to the border.
    ones = torch.ones(1, 2, 5, 5)
    assert torch.equal(inc._tf_avg_pool(ones), ones)
    # Only the last block pools by max.
    assert model.Mixed_7c.max_pool and not model.Mixed_7b.max_pool
    x = torch.randn(1, 2048, 8, 8)
    with torch.no_grad():
        out = model.Mixed_7c(x)
        model.Mixed_7c.max_pool = False
        out_avg = model.Mixed_7c(x)
    assert out.shape == (1, 2048, 8, 8) and not torch.allclose(out[:, -192:], out_avg[:, -192:])
    assert torch.equal(out[:, :-192], out_avg[:, :-192])  # the other branches do not depend on the pool


def test_save_and_reload_strict(weights: Path):
    model = load_inception(weights)
    want = torch.load(weights, weights_only=True)
    got = model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_reload_without_num_batches_tracked(weights: Path, tmp_path: Path):
    sd = {k: v for k, v in torch.load(weights, weights_only=True).items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    model = load_inception(tmp_path / "old.pth")
    assert torch.equal(model.state_dict()["fc.weight"], sd["fc.weight"])


def test_wrong_weight_file_is_refused(weights: Path, tmp_path: Path):
    sd = torch.load(weights, weights_only=True)
    del sd["Mixed_7c.branch_pool.conv.weight"]
    sd["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"(?s)pt_inception-2015-12-05-6726825d\.pth.*Missing key"):
        load_inception(tmp_path / "bad.pth")


def test_missing_file_error_says_what_to_get(tmp_path: Path):
    with pytest.raises(FileNotFoundError) as info:
        load_inception(tmp_path / "nowhere" / "inception.pth")
    msg = str(info.value)
    assert "nowhere" in msg and inc.WEIGHTS_FILE in msg and "nothing is downloaded" in msg
    assert "pytorch-fid" in msg and "--inception" in msg


def test_preprocess_resizes_and_scales():
    img = np.zeros((2, 32, 48, 3), np.uint8)
    img[1] = 255
    x = preprocess(torch.from_numpy(img))
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.tensor(-1.0)) and torch.allclose(x[1], torch.tensor(1.0))
    already = torch.from_numpy(np.full((1, 299, 299, 3), 51, np.uint8))
    assert torch.allclose(preprocess(already), torch.tensor(51 / 255 * 2 - 1))


def test_features_shapes_at_299(weights: Path):
    model = load_inception(weights)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 40, 40, 3), dtype=np.uint8)
    pool, probs = features_and_logits(model, images, batch_size=2)
    assert pool.shape == (2, inc.FEATURE_DIM) and probs.shape == (2, inc.NUM_CLASSES)
    assert pool.dtype == np.float64 and probs.dtype == np.float64
    assert np.all(pool >= 0) and pool.std() > 1e-3  # post-ReLU averages, and not collapsed to 0
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert not np.allclose(pool[0], pool[1])


def test_features_do_not_depend_on_batching(weights: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(inc, "INPUT_SIZE", 75)  # the smallest input the network takes; 16× cheaper than 299
    model = load_inception(weights)
    images = np.random.default_rng(1).integers(0, 256, size=(3, 24, 24, 3), dtype=np.uint8)
    a = features_and_logits(model, images, batch_size=3)
    b = features_and_logits(model, images, batch_size=1)
    assert np.allclose(a[0], b[0], rtol=1e-4, atol=1e-6) and np.allclose(a[1], b[1], rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="uint8"):
        features_and_logits(model, images.astype(np.float32), batch_size=1)


def test_is_probabilities_leave_out_the_fc_bias(weights: Path, monkeypatch: pytest.MonkeyPatch):
    """The original Inception Score code takes softmax(pool3 · Wᵀ), without the graph's softmax bias."""
    monkeypatch.setattr(inc, "INPUT_SIZE", 75)
    model = load_inception(weights)
    model.fc.bias.copy_(torch.linspace(-3, 3, inc.NUM_CLASSES))
    images = np.random.default_rng(2).integers(0, 256, size=(2, 24, 24, 3), dtype=np.uint8)
    pool, probs = features_and_logits(model, images, batch_size=2)
    w = model.fc.weight.double().numpy()
    want = torch.softmax(torch.from_numpy(pool @ w.T), dim=1).numpy()
    assert np.allclose(probs, want, rtol=1e-4, atol=1e-8)
    _, with_bias = features_and_logits(model, images, batch_size=2, fc_bias=True)
    assert not np.allclose(with_bias, probs, rtol=1e-3)
    with torch.no_grad():
        pool_fwd, logits_fwd = model(preprocess(torch.from_numpy(images)))
    assert np.allclose(pool_fwd.double().numpy(), pool, rtol=1e-5, atol=1e-7)
    assert np.allclose(torch.softmax(logits_fwd.double(), 1).numpy(), with_bias, rtol=1e-4, atol=1e-8)
