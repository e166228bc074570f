"""Draw the prior's attention masks from the real ``layer_mask`` for docs/prior.md.

Run from the repository root:

    .venv/bin/python docs/figures/make_mask_figures.py

writes docs/figures/masks.png (text_len 6, 4×4 grid, 3×3 conv kernel, as in [P Fig. 11]) and
docs/figures/masks_grid8.png (text_len 6, 8×8 grid, 5×5 conv kernel, plus the keys of one query drawn on the grid).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from dalle_dist.models.attention import layer_mask  # noqa: E402

OUT = Path(__file__).resolve().parent
KINDS = ("dense", "row", "column", "conv")
CMAP = ListedColormap(["white", "#1f4e9c"])  # masked, attended


def _title(kind: str, kernel: int) -> str:
    return {
        "dense": "dense causal (reference)",
        "row": "row (all other layers)",
        "column": "column (layers i = 2, 6, 10, ...)",
        "conv": f"conv {kernel}×{kernel} (last layer)",
    }[kind]


def draw_mask(ax: Axes, kind: str, text_len: int, grid: int, kernel: int) -> None:
    """One (T, T) mask: rows are queries, columns keys; red lines mark the text/image boundary."""
    mask = layer_mask(kind, text_len, grid, conv_kernel=kernel).numpy()
    seq = mask.shape[0]
    ax.imshow(mask, cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
    for pos in (text_len - 0.5,):
        ax.axhline(pos, color="red", lw=1.2)
        ax.axvline(pos, color="red", lw=1.2)
    if seq <= 30:  # thin cell borders only where they stay readable
        ax.set_xticks(np.arange(-0.5, seq, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, seq, 1), minor=True)
        ax.grid(which="minor", color="#cccccc", lw=0.4)
        ax.tick_params(which="minor", length=0)
    ticks = [text_len / 2 - 0.5, text_len + grid * grid / 2 - 0.5]
    ax.set_xticks(ticks, ["text keys", "image keys"])
    ax.set_yticks(ticks, ["text\nqueries", "image\nqueries"])
    ax.set_title(_title(kind, kernel), fontsize=10)


def draw_query_keys(ax: Axes, kind: str, grid: int, kernel: int, query: tuple[int, int]) -> None:
    """The image keys one image query sees, drawn on the grid (query in orange)."""
    a = query[0] * grid + query[1]
    keys = layer_mask(kind, 0, grid, conv_kernel=kernel)[a].numpy().reshape(grid, grid).astype(float)
    keys[query] = 2.0
    ax.imshow(keys, cmap=ListedColormap(["white", "#1f4e9c", "#f28e2b"]), vmin=0, vmax=2)
    ax.set_xticks(np.arange(-0.5, grid, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, grid, 1), minor=True)
    ax.grid(which="minor", color="#999999", lw=0.5)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    ax.set_title(f"{kind}: image keys (blue) of the query\n(orange) at row {query[0]}, col {query[1]}", fontsize=10)


def figure_masks(text_len: int, grid: int, kernel: int, path: Path, query: tuple[int, int] | None = None) -> None:
    rows = 2 if query else 1
    fig, axes = plt.subplots(rows, 4, figsize=(16, 4.4 * rows), squeeze=False)
    for ax, kind in zip(axes[0], KINDS):
        draw_mask(ax, kind, text_len, grid, kernel)
    if query:
        for ax, kind in zip(axes[1], KINDS):
            draw_query_keys(ax, kind, grid, kernel, query)
    fig.suptitle(
        f"Prior attention masks: text_len={text_len}, grid={grid}×{grid}, conv kernel {kernel} "
        f"(blue = query row may attend key column; red lines = text | image boundary)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    figure_masks(6, 4, 3, OUT / "masks.png")
    figure_masks(6, 8, 5, OUT / "masks_grid8.png", query=(4, 1))


if __name__ == "__main__":
    main()
