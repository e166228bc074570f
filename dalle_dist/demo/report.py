"""The demo's picture report: ``OUT/report.md`` with its figures in ``OUT/figures/`` and ``OUT/summary.json``.

Caption match is the fraction of a caption's attributes (colour, shape, and size / position / relation when the
caption names them) that the synthetic set's judge finds in an image (:func:`dalle_dist.data.shapes.judge_image`);
"reranked" is the same over the K samples per caption the reranker kept [P §2.6].
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.shapes import caption_match

N_RECON = 200  # held-out images reconstructed for the dVAE's judge accuracy
SCALE = 3  # pixel upscaling of the demo's 48 px images in figures
MAX_COLS = 16  # samples per figure row: a caption with more samples wraps onto further rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _shard_images(shards: list[Path], n: int) -> tuple[np.ndarray, list[str]]:
    """The first n decodable (image, caption) pairs of tar shards, in tar order (the project's shard reader)."""
    from ..data.decode import Skip, decode_image, image_bytes
    from ..data.shards import read_shard

    images, captions = [], []
    skipped: Counter = Counter()
    for shard in shards:
        for sample in read_shard(str(shard), skipped):
            data = image_bytes(sample)
            img = data if isinstance(data, Skip) else decode_image(data)
            if isinstance(img, Skip) or "txt" not in sample:
                continue
            images.append(img)
            captions.append(sample["txt"].decode())
            if len(images) == n:
                return np.stack(images), captions
    return np.stack(images), captions


def _upscale(img: np.ndarray, k: int = SCALE) -> np.ndarray:
    return img.repeat(k, axis=0).repeat(k, axis=1)


def _tile(rows: list[list[np.ndarray]], gap: int = 4, frames: list[list[bool]] | None = None) -> Image.Image:
    """Rows of equal-size uint8 images on a white canvas; ``frames`` outlines chosen images in green."""
    h, w, _ = rows[0][0].shape
    cols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + gap) + gap, cols * (w + gap) + gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            y, x = gap + i * (h + gap), gap + j * (w + gap)
            if frames is not None and frames[i][j]:
                canvas[y - gap : y + h + gap, x - gap : x + w + gap] = (0, 200, 0)
            canvas[y : y + h, x : x + w] = im
    return Image.fromarray(canvas)


def _loss_figure(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("dVAE (stage 1)", "dvae", ["loss", "nll"], "loss per dimension"),
        ("dVAE codebook", "dvae", ["codebook_usage"], "codes used per batch"),
        ("prior (stage 2)", "prior", ["loss", "loss_text", "loss_image"], "cross-entropy (nats)"),
        ("reranker", "reranker", ["loss"], "contrastive loss"),
    ]
    panels = [p for p in panels if curves.get(p[1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, key, names, ylabel) in zip(axes[0], panels):
        rows = curves[key]
        for name in names:
            pts = [(r["step"], r[name]) for r in rows if name in r and "step" in r]
            if pts:
                ax.plot(*zip(*pts), label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _dvae_section(out: Path, figures: Path) -> dict[str, Any]:
    """Reconstruct held-out images through the dVAE's argmax codes and judge them against their captions."""
    import torch

    from ..models.loading import load_dvae

    shards = sorted((out / "data" / "heldout").glob("*.tar"))
    images, captions = _shard_images(shards, N_RECON)
    dvae = load_dvae(str(out / "dvae" / "checkpoint.pt"))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)  # (N, 3, H, W)
    with torch.no_grad():
        codes = dvae.encode_codes(x)  # (N, g, g)
        recon = dvae.decode_codes(codes)  # (N, 3, H, W)
    recon_u8 = (recon.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    n_show = 12
    _tile([[_upscale(im) for im in images[:n_show]], [_upscale(im) for im in recon_u8[:n_show]]]).save(
        figures / "dvae_reconstructions.png"
    )
    return {
        "judge_accuracy": round(float(np.mean([caption_match(im, c) for im, c in zip(recon_u8, captions)])), 4),
        "judge_accuracy_originals": round(float(np.mean([caption_match(im, c) for im, c in zip(images, captions)])), 4),
        "n_images": len(images),
        "codes_used": int(codes.unique().numel()),
        "vocab_size": dvae.cfg.vocab_size,
        "mse": round(float(((recon_u8 / 255.0 - images / 255.0) ** 2).mean()), 5),
    }


def _samples_section(out: Path, figures: Path, split: str) -> dict[str, Any]:
    """Judge every sample of a generate run; per-caption figures with the reranker's picks outlined."""
    gen = out / "samples" / split
    index = json.loads((gen / "index.json").read_text())
    per: dict[str, dict[str, Any]] = {}
    for entry in index:
        img = np.asarray(Image.open(gen / entry["file"]).convert("RGB"))
        d = per.setdefault(entry["caption"], {"images": [], "match": [], "selected": [], "rank": []})
        d["images"].append(img)
        d["match"].append(caption_match(img, entry["caption"]))
        d["selected"].append(bool(entry.get("selected", True)))
        d["rank"].append(entry.get("rank", len(d["rank"])))
    rows, frames, table = [], [], []
    for caption, d in per.items():
        order = np.argsort(d["rank"])  # best first
        for start in range(0, len(order), MAX_COLS):  # 32 samples in one row would make a 4,700 px wide figure
            chunk = order[start : start + MAX_COLS]
            rows.append([_upscale(d["images"][i]) for i in chunk])
            frames.append([d["selected"][i] for i in chunk])
        match = np.array(d["match"])
        sel = np.array(d["selected"])
        table.append(
            {"caption": caption, "all": round(float(match.mean()), 4), "reranked": round(float(match[sel].mean()), 4)}
        )
    _tile(rows, frames=frames).save(figures / f"samples_{split}.png")
    all_m = float(np.mean([m for d in per.values() for m in d["match"]]))
    sel_m = float(np.mean([m for d in per.values() for m, s in zip(d["match"], d["selected"]) if s]))
    return {"all": round(all_m, 4), "reranked": round(sel_m, 4), "per_caption": table}


def _eval_value(path: Path) -> float | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("judge", {}).get("caption_match")


def write_report(settings: Any, timings: dict[str, float], steps_seconds: float) -> dict[str, Any]:
    out = Path(settings.out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    curves = {
        "dvae": _read_jsonl(out / "dvae" / "metrics.jsonl"),
        "prior": _read_jsonl(out / "prior" / "metrics.jsonl"),
        "reranker": _read_jsonl(out / "reranker" / "metrics.jsonl"),
    }
    _loss_figure(curves, figures / "loss_curves.png")
    dvae = _dvae_section(out, figures)
    samples = {split: _samples_section(out, figures, split) for split in ("seen", "heldout")}
    prior: dict[str, Any] = {}
    for split in ("seen", "heldout"):
        # The numbers of `dalle-dist eval --judge`; the report's own recount must agree with them.
        for which, suffix in (("all", ""), ("reranked", "_reranked")):
            value = _eval_value(out / "eval" / f"{split}_{which}.json")
            prior[f"caption_match_{split}{suffix}"] = value if value is not None else samples[split][which]
    prior["final_loss"] = curves["prior"][-1].get("loss") if curves["prior"] else None
    prior["steps"] = curves["prior"][-1].get("step") if curves["prior"] else 0
    prior["topology"] = settings.topology
    prior_config = out / "prior" / "config.json"
    if prior_config.is_file():
        prior["precision"] = json.loads(prior_config.read_text()).get("precision", {}).get("dtype")
    reranker_info = out / "reranker" / "reranker.json"
    summary: dict[str, Any] = {
        "dvae": {**dvae, "final_loss": curves["dvae"][-1].get("loss") if curves["dvae"] else None},
        "prior": prior,
        "reranker": json.loads(reranker_info.read_text()).get("metrics", {}) if reranker_info.is_file() else {},
        "samples": {"n_per_caption": settings.n_samples, "rerank_k": settings.rerank_k},
        "timings": timings,
        "seconds": round(sum(timings.values()), 1),
        "wall_seconds_this_run": round(steps_seconds, 1),
        "quick": settings.quick,
    }
    fid_path = out / "eval" / "fid_seen.json"
    if fid_path.is_file():
        summary["fid"] = json.loads(fid_path.read_text()).get("by_blur")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "report.md").write_text(_markdown(summary, samples, settings))
    return summary


def _markdown(summary: dict[str, Any], samples: dict[str, Any], settings: Any) -> str:
    p, d = summary["prior"], summary["dvae"]
    lines = [
        "# dalle_dist demo report",
        "",
        f"The whole recipe on the synthetic shapes set ({settings.n_train} training images, CPU), in "
        f"{summary['seconds']:.0f} s. Regenerate with `make demo`; numbers are in `summary.json`.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| dVAE judge accuracy on reconstructions of {d['n_images']} held-out images | {d['judge_accuracy']:.3f} |",
        f"| same judge on the original images | {d['judge_accuracy_originals']:.3f} |",
        f"| caption match, seen captions ({settings.n_samples} samples each) | {p['caption_match_seen']:.3f} |",
        f"| caption match, seen, reranked (best {settings.rerank_k}) | {p['caption_match_seen_reranked']:.3f} |",
        f"| caption match, held-out pairs | {p['caption_match_heldout']:.3f} |",
        f"| caption match, held-out pairs, reranked | {p['caption_match_heldout_reranked']:.3f} |",
        "",
        "Caption match: the fraction of a caption's attributes (colour, shape, and size or position when named) that "
        "the judge finds in the image. Held-out pairs are (colour, shape) combinations that never occur in training.",
        "",
        "## Training curves",
        "",
        "![loss curves](figures/loss_curves.png)",
        "",
        f"Prior: {p['steps']} steps on `{p['topology']}` (2 gloo processes via torchrun, `-m dalle_dist.launch`), "
        f"computing in {p.get('precision') or 'fp32'}.",
        "",
        "## dVAE reconstructions",
        "",
        "Top: held-out images; bottom: decoded from their argmax codes "
        f"({d['codes_used']} of {d['vocab_size']} codes used on these images).",
        "",
        "![reconstructions](figures/dvae_reconstructions.png)",
        "",
    ]
    for split, title in (("seen", "Seen captions"), ("heldout", "Held-out (zero-shot) pairs")):
        lines += [
            f"## {title}",
            "",
            f"Each caption's {settings.n_samples} samples in order of the reranker's score (best first), "
            f"{MAX_COLS} to a row, captions in the table's order; the {settings.rerank_k} kept are outlined in green.",
            "",
            f"![{split}](figures/samples_{split}.png)",
            "",
            "| caption | caption match (all) | reranked |",
            "|---|---|---|",
        ]
        lines += [f"| {r['caption']} | {r['all']:.3f} | {r['reranked']:.3f} |" for r in samples[split]["per_caption"]]
        lines.append("")
    if "fid" in summary:
        lines += ["## FID / IS (seen samples vs held-out images)", "", "| blur | FID | IS |", "|---|---|---|"]
        lines += [f"| {r['blur']} | {r['fid']:.2f} | {r['is_mean']:.2f} |" for r in summary["fid"] or []]
        lines.append("")
    lines += ["## Time per step", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in summary["timings"].items()]
    return "\n".join(lines) + "\n"
