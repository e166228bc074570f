"""Attention masks and layer kinds against loop-by-loop definitions written from the rule text [P B.1, Fig. 11]."""

from __future__ import annotations

import pytest
import torch

from dalle_dist.models.attention import (
    KVCache,
    attend,
    cached_layer_mask,
    layer_kinds,
    layer_mask,
)

GRIDS = [2, 3, 4, 5, 8]
TEXT_LENS = [1, 3, 6]


def brute_force_mask(kind: str, text_len: int, grid: int, kernel: int) -> torch.Tensor:
    """One pair at a time, straight from the written rules."""
    seq = text_len + grid * grid
    mask = torch.zeros(seq, seq, dtype=torch.bool)
    for i in range(seq):
        for j in range(seq):
            if kind == "dense":
                allowed = j <= i
            elif i < text_len:  # text query: causal over text, never image
                allowed = j < text_len and j <= i
            elif j < text_len:  # image query, text key: always
                allowed = True
            else:
                a, b = i - text_len, j - text_len
                ra, ca, rb, cb = a // grid, a % grid, b // grid, b % grid
                if b > a:
                    allowed = False
                elif kind == "row":
                    allowed = a - grid <= b
                elif kind == "column":
                    allowed = ca == cb
                elif kind == "conv":
                    allowed = abs(rb - ra) <= kernel // 2 and abs(cb - ca) <= kernel // 2
                else:
                    raise AssertionError(kind)
            mask[i, j] = allowed
    return mask


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("text_len", TEXT_LENS)
def test_masks_match_brute_force(grid: int, text_len: int) -> None:
    cases = [("row", 11), ("column", 11), ("dense", 11), ("conv", 3), ("conv", 5), ("conv", 11)]
    for kind, kernel in cases:
        got = layer_mask(kind, text_len, grid, conv_kernel=kernel)
        assert got.dtype == torch.bool and got.shape == (text_len + grid * grid,) * 2
        assert torch.equal(got, brute_force_mask(kind, text_len, grid, kernel)), (kind, kernel)


@pytest.mark.parametrize("kind", ["row", "column", "conv", "dense"])
@pytest.mark.parametrize("grid", [3, 4, 8])
def test_mask_invariants(kind: str, grid: int) -> None:
    text_len = 6
    mask = layer_mask(kind, text_len, grid, conv_kernel=5)
    assert torch.equal(mask, torch.tril(mask)), "masks must be causal (lower-triangular)"
    assert mask.diagonal().all(), "every query sees itself"
    assert mask[text_len:, :text_len].all(), "every image query sees every text key"
    assert not mask[:text_len, text_len:].any(), "text never sees image"


def test_fig11_row_example() -> None:
    """4×4 grid, 6 text tokens: row attention sees at most the previous 5 image tokens (self included) [Fig. 11]."""
    mask = layer_mask("row", 6, 4)
    image_part = mask[6:, 6:]  # (16, 16)
    counts = image_part.sum(dim=1)
    assert counts.max().item() == 5
    assert counts.tolist() == [1, 2, 3, 4] + [5] * 12
    # "the last token being attended to is the one in the same column of the previous row"
    assert image_part[5, 1] and not image_part[5, 0]


def test_conv_has_no_wraparound() -> None:
    grid, kernel = 4, 3
    image_part = layer_mask("conv", 0, grid, conv_kernel=kernel)
    a = 1 * grid + 0  # row 1, column 0
    assert not image_part[a, grid - 1], "column 3 of row 0 is not a neighbour of column 0 of row 1"
    assert image_part[a, 0] and image_part[a, 1]


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="valid kinds"):
        layer_mask("diagonal", 2, 2)


@pytest.mark.parametrize(
    ("n_layers", "expected"),
    [(1, ["conv"]), (4, ["row", "column", "row", "conv"])],
)
def test_layer_kinds_small(n_layers: int, expected: list[str]) -> None:
    assert layer_kinds(n_layers) == expected


def test_layer_kinds_dense_layout() -> None:
    assert layer_kinds(4, "dense") == ["dense"] * 4
    assert layer_kinds(4, "paper") == layer_kinds(4)
    with pytest.raises(ValueError, match="valid layouts"):
        layer_kinds(4, "sparse")


def test_layer_kinds_64() -> None:
    kinds = layer_kinds(64)
    assert len(kinds) == 64
    assert kinds[:4] == ["row", "column", "row", "row"]  # [P B.1]
    assert kinds[-1] == "conv" and kinds.count("conv") == 1
    assert kinds.count("column") == 16 and kinds.count("row") == 47
    assert [i + 1 for i, k in enumerate(kinds) if k == "column"] == list(range(2, 63, 4))


def test_cached_mask_is_shared_and_on_device() -> None:
    a = cached_layer_mask("row", 3, 4, 11, "cpu")
    b = cached_layer_mask("row", 3, 4, 11, torch.device("cpu"))
    assert a is b and torch.equal(a, layer_mask("row", 3, 4))
    meta = cached_layer_mask("conv", 3, 4, 3, "meta")
    assert meta.is_meta and meta.shape == (19, 19)


def test_mask_ignores_default_meta_device() -> None:
    with torch.device("meta"):
        mask = layer_mask("column", 2, 3)
    assert not mask.is_meta


def test_attend_with_kv_cache_matches_full() -> None:
    """Writing keys one position at a time and attending with the mask rows equals one full pass."""
    torch.manual_seed(0)
    text_len, grid = 3, 3
    seq = text_len + grid * grid
    q, k, v = (torch.randn(2, 2, seq, 4) for _ in range(3))
    mask = layer_mask("conv", text_len, grid, conv_kernel=3)
    full = attend(q, k, v, mask)
    cache = KVCache(2, 2, seq, 4)
    keys, values = cache.update(k[:, :, :text_len], v[:, :, :text_len], 0)
    steps = [attend(q[:, :, :text_len], keys, values, mask[:text_len, :text_len])]
    for s in range(text_len, seq):
        keys, values = cache.update(k[:, :, s : s + 1], v[:, :, s : s + 1], s)
        steps.append(attend(q[:, :, s : s + 1], keys, values, mask[s : s + 1, : s + 1]))
    torch.testing.assert_close(torch.cat(steps, dim=2), full)
    with pytest.raises(ValueError, match="gap"):
        cache.update(k[:, :, :1], v[:, :, :1], seq + 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attend_runs_the_cpu_kernel_in_fp32_for_16_bit_inputs(dtype) -> None:
    """On CPU, 16-bit q/k/v (under autocast, as a 16-bit resblock sees them) go through the fp32 kernel: the result
    is the fp32 attention of the same 16-bit values, rounded once, in the input dtype."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, 8).to(dtype) for _ in range(3))
    mask = layer_mask("row", 3, 3)
    with torch.autocast("cpu", dtype=dtype):
        got = attend(q, k, v, mask)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    assert got.dtype == dtype
    assert torch.equal(got, want.to(dtype))
    # 16-bit gradients come back for 16-bit inputs
    qg = q.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        attend(qg, k, v, mask).float().sum().backward()
    assert qg.grad is not None and qg.grad.dtype == dtype and torch.isfinite(qg.grad).all()
