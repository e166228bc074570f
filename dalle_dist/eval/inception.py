"""The FID variant of Inception-v3: TensorFlow's 2015-12-05 graph as ported to PyTorch by pytorch-fid.

FID and IS numbers are only comparable with the literature when computed with this exact network: the weights of
the TF graph (``pt_inception-2015-12-05-6726825d.pth``, a release file of the pytorch-fid project), 1008 output
classes, and three quirks of the TF graph that differ from torchvision's Inception-v3:

- the 3×3 average pools inside the A, C and first E blocks divide by the number of *real* pixels under the window
  (``count_include_pad=False``), as TF's ``avg_pool`` with SAME padding does;
- the pool branch of the last block (``Mixed_7c``) is a 3×3 *max* pool, not an average pool;
- the input is a float image in [0, 1] resized to 299×299 bilinearly (half-pixel centres, no antialiasing) and
  mapped to [-1, 1] by ``2x - 1``.

The Inception Score takes the softmax of ``pool3 · Wᵀ`` *without* the fc bias, as the original IS code does (it
multiplies pool3 by the graph's softmax weights only); :func:`features_and_logits` has ``fc_bias`` for the other
choice.

Module and parameter names follow the weight file (``Conv2d_1a_3x3.conv.weight``, ``Mixed_7c.branch_pool.bn.
running_var``, ``fc.weight``, …) so it loads with ``strict=True``. Nothing is ever downloaded: :func:`load_inception`
reads a local file and says where to get it when it is absent.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
INPUT_SIZE = 299  # the side every image is resized to before the network
NUM_CLASSES = 1008  # the TF graph's softmax: 1000 ImageNet classes plus 8 unused
FEATURE_DIM = 2048  # pool3: the global average pool after Mixed_7c, the FID features


_Size = int | tuple[int, int]


class ConvBN(nn.Module):
    """Convolution without bias → batch norm (ε = 1e-3, TF's) → ReLU; named ``conv`` and ``bn`` as in the file."""

    def __init__(self, cin: int, cout: int, kernel: _Size, stride: int = 1, padding: _Size = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3×3 stride-1 average over the pixels inside the image only (TF SAME padding semantics)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35×35 block (Mixed_5b/c/d): 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg pool→1×1; 224 + ``pool_ch`` channels out."""

    def __init__(self, cin: int, pool_ch: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([a, b, c, d], 1)


class BlockB(nn.Module):
    """Grid reduction 35→17 (Mixed_6a): stride-2 3×3 | 1×1→3×3→stride-2 3×3 | stride-2 max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    """17×17 block (Mixed_6b–e) with factorised 7×7 convolutions (1×7 and 7×1) of ``c7`` channels; 768 out."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = conv(c)
        d = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([a, b, c, d], 1)


class BlockD(nn.Module):
    """Grid reduction 17→8 (Mixed_7a): 1×1→stride-2 3×3 | 1×1→1×7→7×1→stride-2 3×3 | stride-2 max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = conv(b)
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """8×8 block (Mixed_7b/c) with split 1×3 / 3×1 outputs; 2048 out. ``max_pool``: the pool branch of the TF
    graph's last block (Mixed_7c) takes a max, not an average."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([a, b, c, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the FID weight file. ``forward(x)`` takes (N, 3, 299, 299) in [-1, 1] and returns the
    pool3 features (N, 2048) and the logits (N, 1008)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)  # 299 → 149
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)  # → 147
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)  # after a 3×3/2 max pool: 73
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)  # → 71, then a 3×3/2 max pool: 35
        self.Mixed_5b = BlockA(192, pool_ch=32)  # → 256
        self.Mixed_5c = BlockA(256, pool_ch=64)  # → 288
        self.Mixed_5d = BlockA(288, pool_ch=64)  # → 288
        self.Mixed_6a = BlockB(288)  # → 768 at 17×17
        self.Mixed_6b = BlockC(768, c7=128)
        self.Mixed_6c = BlockC(768, c7=160)
        self.Mixed_6d = BlockC(768, c7=160)
        self.Mixed_6e = BlockC(768, c7=192)
        self.Mixed_7a = BlockD(768)  # → 1280 at 8×8
        self.Mixed_7b = BlockE(1280, max_pool=False)  # → 2048
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.pool3(x)
        return pool, self.fc(pool)

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 299, 299) in [-1, 1] → the 2048-d global average pool after Mixed_7c."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))  # (N, 2048)


def missing_weights_message(path: str) -> str:
    return (
        f"Inception weights not found at {path!r}. FID and IS need the FID Inception-v3 weights as a local file; "
        f"nothing is downloaded. Expected: {WEIGHTS_FILE} (TensorFlow's 2015-12-05 Inception graph ported to "
        f"PyTorch), a release file of the pytorch-fid project: {WEIGHTS_URL}. Fetch it on a machine with internet "
        "access and pass its path with --inception."
    )


def load_inception(path: str | os.PathLike, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The network with the weights of ``path`` (a state dict saved by ``torch.save``), loaded strictly, in eval
    mode. Raises :class:`FileNotFoundError` naming the expected file when ``path`` does not exist."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_weights_message(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    with torch.device("meta"):  # no random initialisation: every tensor comes from the file
        model = FIDInceptionV3()
    # Batch-norm step counters carry no information in eval; files written before they existed lack them.
    for key in model.state_dict():
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(
            f"{path} does not hold the FID Inception-v3 weights ({WEIGHTS_FILE} from pytorch-fid): {err}"
        ) from err
    return model.float().eval().requires_grad_(False).to(device)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, 299, 299) in [-1, 1]: scaled to [0, 1], resized bilinearly (no
    antialiasing, half-pixel centres) and mapped by 2x − 1, as pytorch-fid does."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return x.mul_(2.0).sub_(1.0)


@torch.no_grad()
def features_and_logits(
    model: FIDInceptionV3,
    images: np.ndarray,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: str | None = None,
    fc_bias: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """pool3 features (N, 2048) and class probabilities (N, 1008), both float64, of uint8 images (N, H, W, 3).

    The probabilities are the softmax of the logits, which the Inception Score consumes. ``fc_bias=False``
    (default): logits = pool3 · Wᵀ without the fc bias, as the original Inception Score code (Salimans et al.
    2016, which multiplies pool3 by the graph's softmax weights only) and torch-fidelity's exact replica compute
    them; ``True``: the full fc layer. ``progress``: a label for a line on stderr every ~10 s.
    """
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3); got {arr.dtype} {arr.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    model = model.to(device).eval()
    pools, probs = [], []
    t0 = last = time.monotonic()
    for start in range(0, len(arr), batch_size):
        x = preprocess(torch.from_numpy(arr[start : start + batch_size]).to(device))
        pool = model.pool3(x)
        logits = F.linear(pool, model.fc.weight, model.fc.bias if fc_bias else None)
        pools.append(pool.double().cpu().numpy())
        probs.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
        if progress and time.monotonic() - last > 10:
            last = time.monotonic()
            done = min(start + batch_size, len(arr))
            print(f"{progress}: {done}/{len(arr)} images ({done / (last - t0):.1f}/s)", file=sys.stderr)
    if not pools:
        return np.zeros((0, FEATURE_DIM)), np.zeros((0, NUM_CLASSES))
    return np.concatenate(pools), np.concatenate(probs)
