"""``dalle-dist eval``: FID and IS between generated and reference images, over Gaussian blur radii, and the
synthetic set's caption match [P §3.1, Fig. 9].

- **FID / IS**: every image of both sets is blurred with a Gaussian of each radius (0 = none; the paper goes from 0
  to 8), passed through the FID Inception-v3 (:mod:`.inception`, weights read from a local file) and scored with
  :mod:`.fid`: FID between the pool3 features of the two sets, IS of the generated set's class probabilities.
  Reference images are centre-cropped to the generated images' aspect ratio and resized to their size first, so
  both sets are blurred at the same resolution.
- **Judge**: each generated image against the caption it was sampled for (``index.json`` of ``dalle-dist
  generate``), with :func:`dalle_dist.data.shapes.judge_image`; needs no Inception weights and no reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_BLUR = tuple(range(9))  # radii 0, 1, …, 8 [P §3.1, Fig. 9]
INDEX = "index.json"


class EvalError(Exception):
    """A problem with the command's inputs; the message says what to change."""


def _log(msg: str) -> None:
    print(f"eval: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Reading the image sets
# --------------------------------------------------------------------------------------------------


def _read_png(path: Path) -> np.ndarray:
    from ..data.decode import Skip, decode_image

    arr = decode_image(path.read_bytes())
    if isinstance(arr, Skip):
        raise EvalError(f"cannot read image {path}: {arr.reason}")
    return arr


def read_image_dir(
    directory: str, max_images: int | None = None, selected_only: bool = False
) -> tuple[list[np.ndarray], list[str | None]]:
    """Images (uint8 (H, W, 3)) of a directory and their captions.

    With ``index.json`` (``dalle-dist generate``'s: a list of objects with ``"file"`` and ``"caption"``; other keys
    are ignored) its files are read in its order; without it, every image file below the directory in name order,
    with no captions (``grid.png`` at the top level is a contact sheet, not a sample, and is left out).
    """
    root = Path(directory)
    if not root.is_dir():
        raise EvalError(f"{directory!r} is not a directory")
    index_path = root / INDEX
    if index_path.is_file():
        try:
            entries = json.loads(index_path.read_text())
        except ValueError as err:
            raise EvalError(f"{index_path} is not valid JSON: {err}") from err
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "file" in e for e in entries):
            raise EvalError(f"{index_path} must be a list of objects with a 'file' key (and 'caption')")
        if selected_only:
            if not any("selected" in e for e in entries):
                raise EvalError(f"--selected-only: {index_path} has no 'selected' keys (generate with --rerank K)")
            entries = [e for e in entries if e.get("selected")]
        files = [root / str(e["file"]) for e in entries]
        captions = [e.get("caption") if isinstance(e.get("caption"), str) else None for e in entries]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise EvalError(f"{len(missing)} file(s) named in {index_path} do not exist, e.g. {missing[0]}")
    elif selected_only:
        raise EvalError(f"--selected-only needs {index_path} from `dalle-dist generate --rerank K`")
    else:
        files = sorted(
            p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p != root / "grid.png" and p.is_file()
        )
        captions = [None] * len(files)
    if max_images is not None:
        files, captions = files[:max_images], captions[:max_images]
    return [_read_png(f) for f in files], captions


def read_shard_images(spec: str, max_images: int | None = None) -> tuple[list[np.ndarray], Counter]:
    """Images of webdataset shards (brace patterns, comma-separated, or a directory of .tar files), in order;
    undecodable samples are counted by reason instead of stopping the run."""
    from ..data.decode import Skip, decode_image, image_bytes
    from ..data.shards import expand_shards, read_shard

    urls = expand_shards(spec)
    skipped: Counter = Counter()
    out: list[np.ndarray] = []
    for url in urls:
        for sample in read_shard(url, skipped):
            data = image_bytes(sample)
            arr = data if isinstance(data, Skip) else decode_image(data)
            if isinstance(arr, Skip):
                skipped[arr.reason] += 1
                continue
            out.append(arr)
            if max_images is not None and len(out) >= max_images:
                return out, skipped
    return out, skipped


def _has_images(directory: str) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in Path(directory).rglob("*"))


def read_reference(spec: str, max_images: int | None = None) -> tuple[list[np.ndarray], dict[str, int]]:
    """A directory holding image files → those images; anything else (a shard file, brace pattern or a directory
    of ``.tar`` shards) → the images of the shards."""
    if os.path.isdir(spec) and _has_images(spec):
        return read_image_dir(spec, max_images)[0], {}
    images, skipped = read_shard_images(spec, max_images)
    return images, dict(skipped)


def fit_to(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop ``img`` to the aspect ratio height:width and resize it to that size (bicubic, antialiased)."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    if h * width > w * height:  # too tall: crop rows
        ch, cw = max(1, round(w * height / width)), w
    else:
        ch, cw = h, max(1, round(h * width / height))
    top, left = (h - ch) // 2, (w - cw) // 2
    im = Image.fromarray(img[top : top + ch, left : left + cw])
    return np.asarray(im.resize((width, height), Image.Resampling.BICUBIC))


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def judge_captions(images: list[np.ndarray], captions: list[str | None]) -> dict[str, Any]:
    """The synthetic judge over (image, caption) pairs: mean fraction of caption attributes satisfied, fraction of
    images satisfying all, and accuracy per attribute (colour, shape, size, position, relation)."""
    from ..data.shapes import JudgeTally, judge_image

    tally = JudgeTally()
    for img, caption in zip(images, captions):
        if caption is None:
            tally.errors += 1
            continue
        try:
            checks = judge_image(img, caption)
        except ValueError:  # a caption the synthetic grammar cannot parse
            tally.errors += 1
            continue
        tally.add(checks)
    return tally.summary()


def fid_of_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between feature sets a (n1, D) and b (n2, D): the value of :func:`.fid.fid_from_features`, computed
    without D×D matrix square roots when the sets are small (n1·n2 ≤ D²).

    With centred features X1, X2, Σi = XiᵀXi / (ni − 1). The non-zero eigenvalues of Σ1Σ2 are those of
    X1X2ᵀX2X1ᵀ / ((n1 − 1)(n2 − 1)), i.e. the squared singular values of X1X2ᵀ scaled, so
    tr((Σ1Σ2)^½) = ‖X1X2ᵀ‖_* / √((n1 − 1)(n2 − 1)) (nuclear norm) and tr Σi = ‖Xi‖_F² / (ni − 1): an n1×n2 SVD
    instead of two D×D eigendecompositions (seconds each for D = 2048 on one core).
    """
    from .fid import fid_from_features

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"features must be (N >= 2, D) with the same D; got {x.shape} and {y.shape}")
    d = x.shape[1]
    if len(x) * len(y) > d * d:
        return fid_from_features(x, y)
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mx, y - my
    n1, n2 = len(x) - 1, len(y) - 1
    cross = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt(n1 * n2)
    diff = mx - my
    value = float(diff @ diff + (xc * xc).sum() / n1 + (yc * yc).sum() / n2 - 2.0 * cross)
    return max(value, 0.0)  # ≥ 0 exactly; a set against itself can come out at -1e-13 from rounding


def _parse_blur(text: str | None) -> list[float]:
    if text is None:
        return [float(r) for r in DEFAULT_BLUR]
    try:
        radii = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise EvalError(f"--blur {text!r}: give comma-separated radii, e.g. 0,1,2,4,8") from err
    if not radii or any(r < 0 for r in radii):
        raise EvalError(f"--blur {text!r}: give one or more radii >= 0")
    return list(dict.fromkeys(radii))


def _device(name: str) -> str:
    from ..devices import DeviceError, resolve_device

    try:
        return str(resolve_device(name))
    except DeviceError as err:
        raise EvalError(str(err)) from None


def _is_splits(asked: int, n: int) -> int:
    """IS parts actually used: as asked, but at least 2 images a part (a part of one image always scores 1)."""
    return max(1, min(asked, n // 2))


def _radius_key(r: float) -> int | float:
    return int(r) if float(r).is_integer() else r


def inception_metrics(
    generated: np.ndarray,
    reference: np.ndarray | None,
    model: Any,
    radii: list[float],
    batch_size: int,
    device: str,
    is_splits: int,
) -> list[dict[str, Any]]:
    """One row per blur radius: FID (generated vs reference; only with a reference) and IS of the generated set."""
    from .fid import gaussian_blur, inception_score
    from .inception import features_and_logits

    rows = []
    splits = _is_splits(is_splits, len(generated))
    for r in radii:
        t0 = time.monotonic()
        g_feat, g_prob = features_and_logits(
            model, gaussian_blur(generated, r), batch_size, device, progress=f"eval: blur {r:g} generated"
        )
        is_mean, is_std = inception_score(g_prob, splits=splits)
        row: dict[str, Any] = dict(blur=_radius_key(r))
        if reference is not None:
            r_feat, _ = features_and_logits(
                model, gaussian_blur(reference, r), batch_size, device, progress=f"eval: blur {r:g} reference"
            )
            row["fid"] = fid_of_features(g_feat, r_feat)
        row.update(is_mean=is_mean, is_std=is_std)
        rows.append(row)
        fid_text = f"FID {row['fid']:.3f}, " if "fid" in row else ""
        _log(f"blur {r:g}: {fid_text}IS {is_mean:.3f} ± {is_std:.3f} ({time.monotonic() - t0:.1f} s)")
    return rows


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def _stack(images: list[np.ndarray], height: int, width: int) -> np.ndarray:
    return np.stack([fit_to(im, height, width) for im in images])


def _load_model(args: argparse.Namespace) -> tuple[Any, str | None]:
    """The Inception model and its device when FID / IS are asked for (``(None, None)`` for ``--judge`` alone)."""
    want_inception = args.inception is not None or args.blur is not None or not args.judge
    if want_inception and args.inception is None:
        raise EvalError(
            "FID and IS need the FID Inception-v3 weights: pass --inception PATH to a local copy of "
            "pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release file; nothing is downloaded). "
            "--judge alone (without --blur) scores the synthetic caption match and needs no weights."
        )
    if not want_inception:
        return None, None
    from .inception import load_inception

    device = _device(args.device)
    model = load_inception(args.inception, device=device)  # first: a missing file fails before any work
    if args.reference is None:
        _log("no --reference: FID is skipped, IS of the generated images only")
    return model, device


def _read_generated(args: argparse.Namespace) -> tuple[list[np.ndarray], list[str | None], int, int]:
    """The generated images, their captions, and the most common (height, width) they are all scored at."""
    _log(f"reading generated images from {args.generated}")
    gen_list, captions = read_image_dir(args.generated, args.max_images, args.selected_only)
    if not gen_list:
        raise EvalError(f"no images in {args.generated} (PNG/JPEG/WebP files, or index.json)")
    shapes = Counter(im.shape[:2] for im in gen_list)
    (height, width), _ = shapes.most_common(1)[0]
    if len(shapes) > 1:
        _log(f"generated images differ in size {sorted(shapes)}: all are resized to {height}x{width}")
    return gen_list, captions, height, width


def _read_reference_stack(args: argparse.Namespace, height: int, width: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The reference images fitted to (height, width), and their entry of the result."""
    _log(f"reading reference images from {args.reference}")
    ref_list, skipped = read_reference(args.reference, args.max_images)
    if len(ref_list) < 2:
        raise EvalError(f"FID needs at least 2 reference images; {args.reference} gave {len(ref_list)}")
    reference = _stack(ref_list, height, width)
    return reference, {"path": args.reference, "n": len(reference), "skipped": skipped}


def _add_inception(
    result: dict[str, Any],
    args: argparse.Namespace,
    generated: np.ndarray,
    radii: list[float],
    model: Any,
    device: str | None,
) -> None:
    """FID (with ``--reference``) and IS of ``generated`` (N, H, W, 3) per blur radius, into ``result``."""
    if len(generated) < 2:
        raise EvalError("FID and IS need at least 2 generated images")
    height, width = generated.shape[1:3]
    reference = None
    if args.reference is not None:
        reference, result["reference"] = _read_reference_stack(args, height, width)
    splits = _is_splits(args.is_splits, len(generated))
    result["inception"] = {"weights": str(args.inception), "device": device, "is_splits": splits}
    result["by_blur"] = inception_metrics(generated, reference, model, radii, args.batch_size, device, args.is_splits)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """The whole evaluation as one JSON-ready dict (raises :class:`EvalError` on bad inputs)."""
    t_start = time.monotonic()
    if args.batch_size < 1 or (args.max_images is not None and args.max_images < 1) or args.is_splits < 1:
        raise EvalError("--batch-size, --max-images and --is-splits must be >= 1")
    radii = _parse_blur(args.blur)
    model, device = _load_model(args)

    gen_list, captions, height, width = _read_generated(args)
    result: dict[str, Any] = {
        "generated": {"path": args.generated, "n": len(gen_list), "size": [height, width]},
    }

    if args.judge:
        if all(c is None for c in captions):
            raise EvalError(f"--judge needs captions: {args.generated} has no {INDEX} with a 'caption' per file")
        _log(f"judging {len(gen_list)} images against their captions")
        result["judge"] = judge_captions(gen_list, captions)

    if model is not None:
        generated = _stack(gen_list, height, width)
        del gen_list
        _add_inception(result, args, generated, radii, model, device)
    result["seconds"] = round(time.monotonic() - t_start, 3)
    return result


def format_result(result: dict[str, Any]) -> str:
    gen = result["generated"]
    lines = [f"generated: {gen['path']} ({gen['n']} images, {gen['size'][0]}x{gen['size'][1]})"]
    if "reference" in result:
        ref = result["reference"]
        lines.append(f"reference: {ref['path']} ({ref['n']} images)")
    if "by_blur" in result:
        lines.append(f"{'blur':>6}  {'FID':>10}  {'IS':>16}")
        for row in result["by_blur"]:
            fid = f"{row['fid']:10.3f}" if "fid" in row else f"{'-':>10}"
            lines.append(f"{row['blur']:>6}  {fid}  {row['is_mean']:8.3f} ± {row['is_std']:<5.3f}")
    if "judge" in result:
        j = result["judge"]
        lines.append(f"judge: caption match {j['caption_match']:.4f}, exact {j['exact']:.4f} over {j['n']} images")
        lines.extend(f"  {k:<10} {v:.4f}" for k, v in j["per_attribute"].items())
        if j["errors"]:
            lines.append(f"  ({j['errors']} images without a judgeable caption)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``dalle-dist eval``; 0 on success, 2 on bad inputs (message on stderr)."""
    from ..data.shards import ShardError

    try:
        result = evaluate(args)
    except (EvalError, ShardError, FileNotFoundError) as err:
        print(f"dalle-dist eval: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # e.g. a weight file that is not the FID Inception
        print(f"dalle-dist eval: {err}", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result) if args.json else format_result(result))
    return 0


DESCRIPTION = """\
Evaluate generated images [P §3.1, Fig. 9].

FID / IS (needs --inception): both image sets are blurred with a Gaussian of each radius in --blur (default
0,1,...,8; 0 = no blur), passed through the FID variant of Inception-v3 (TensorFlow's 2015-12-05 graph as ported
by pytorch-fid: images resized to 299x299 bilinearly and scaled to [-1, 1]), and scored: FID between the 2048-d
pool3 features of the generated and the reference set, and the Inception Score (mean, std over --is-splits
parts, at most N/2) of the generated set's 1008-way class probabilities. Reference images are centre-cropped
to the generated images' aspect ratio and resized to their size before blurring. All images are held in
memory: use --max-images for large sets (the paper: 30,000 samples at 256x256).

Inception weights are read from a local file, never downloaded: --inception PATH to
pt_inception-2015-12-05-6726825d.pth, the release file of the pytorch-fid project
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth).
Without --inception, FID/IS are refused with an error.

Judge (--judge): for the synthetic shapes set, each generated image is checked against the caption it was
sampled for (index.json): the mean fraction of the caption's attributes satisfied, the fraction of images
satisfying all of them, and the accuracy per attribute (colour, shape, size, position, relation). Needs neither
weights nor a reference; with --judge and without --inception/--blur only the judge runs.

Generated: a directory of images; with index.json (written by `dalle-dist generate`: a list of
{"caption", "file", ...}) its files in its order and their captions, else every PNG/JPEG/WebP below it in
name order (except grid.png). Reference: a directory of images, or webdataset shards (a .tar, a brace pattern
like 'data/shapes/train-{000000..000003}.tar', comma-separated patterns, or a directory of .tar files).

Output: a table on stdout, or one JSON object with --json (keys: generated, reference, inception, by_blur
[{blur, fid, is_mean, is_std}], judge {n, caption_match, exact, per_attribute, errors}, seconds); progress on
stderr. Exit status 2 on bad inputs.
"""

EPILOG = """\
examples:
  dalle-dist eval --generated runs/samples --reference 'data/coco/val-{000000..000009}.tar' \\
      --inception weights/pt_inception-2015-12-05-6726825d.pth --max-images 30000 --json
  dalle-dist eval --generated runs/samples --judge --json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generated", required=True, metavar="DIR", help="directory of generated images (+ index.json)")
    p.add_argument(
        "--reference",
        metavar="DIR_OR_SHARDS",
        help="reference images: a directory of images or webdataset shards (brace pattern); needed for FID",
    )
    p.add_argument(
        "--inception", metavar="PATH", help="local pt_inception-2015-12-05-6726825d.pth (needed for FID and IS)"
    )
    p.add_argument(
        "--blur",
        metavar="R,R,...",
        help="Gaussian blur radii in pixels applied to both sets, comma-separated (default 0,1,2,3,4,5,6,7,8)",
    )
    p.add_argument(
        "--selected-only",
        action="store_true",
        help="only the samples the reranker kept (index.json 'selected', from generate --rerank K)",
    )
    p.add_argument("--judge", action="store_true", help="score generated images against their captions (shapes set)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--out", metavar="FILE.json", help="also write the JSON object to this file")
    p.add_argument("--batch-size", type=int, default=32, help="images per Inception forward pass (default 32)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where Inception runs")
    p.add_argument("--max-images", type=int, metavar="N", help="use at most the first N images of each set")
    p.add_argument(
        "--is-splits", type=int, default=10, help="IS parts for mean ± std (default 10; at most one per 2 images)"
    )


def _dispatch(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise SystemExit(f"dalle-dist eval: unrecognized arguments: {' '.join(extra)}")
    return run(args)


def register(sub: Any) -> None:
    """Add ``eval`` to the top-level subparsers of ``dalle-dist``."""
    p = sub.add_parser(
        "eval",
        help="FID and IS over blur radii vs reference images; caption match of the synthetic judge",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(run=_dispatch)
