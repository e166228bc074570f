"""The built-in synthetic captioned-shapes set, and the judge that scores an image against a caption.

Why a synthetic set: the CPU tests and ``make demo`` need image-caption pairs that a tiny dVAE (64 px → 8×8
tokens) and a tiny prior can learn in minutes, with captions whose truth can be checked automatically, so that
zero-shot composition [P §3] can be measured on attribute combinations held out of training.

- **Scenes**: a black background and one or two axis-aligned objects. Colours are far apart in RGB
  (:data:`COLOURS`), shapes differ in silhouette (:data:`SHAPES`), two sizes, nine positions on a 3×3 grid;
  two objects sit in opposite columns (or rows) of one lane, so "left of" / "above" are unambiguous.
- **Determinism**: sample ``i`` of a split is a pure function of ``(seed, split, i)``, so any subset can be
  regenerated; PNG (lossless) and tar members with mtime 0 make shards byte-identical across runs.
- **Held-out**: :func:`heldout_pairs` fixes (colour, shape) pairs from the seed; training never draws them, the
  ``heldout/`` shards always contain one.
- **Judge**: pixels far from the background get the palette colour nearest to their chroma (colour / max
  channel, which a blur towards black leaves unchanged); 4-connected components of one colour are objects;
  shape, size and centre come from fitting blurred templates to each component, so a soft reconstruction is
  still judged right. docs/synthetic.md has the method and the measured accuracy.

The code is in three modules, all re-exported here: :mod:`.shapes_scene` (constants, renderer, caption
grammar and parser), :mod:`.shapes_judge` (detection and judging), :mod:`.shapes_cli` (shards and commands).
"""

from .shapes_cli import cli_judge, cli_shapes, judge_shards, write_shapes
from .shapes_judge import (
    FG_THRESHOLD,
    SIZE_SPLIT,
    Detection,
    JudgeTally,
    attribute_name,
    caption_match,
    detect_objects,
    judge_image,
)
from .shapes_scene import (
    COLOURS,
    N_HELDOUT_PAIRS,
    POS_JITTER,
    POSITIONS,
    POSITIONS_V,
    RELATIONS,
    SHAPES,
    SIZE_JITTER,
    SIZES,
    TWO_OBJECT_FRACTION,
    VERSION,
    ObjectSpec,
    Sample,
    generate_sample,
    heldout_pairs,
    parse_caption,
)

__all__ = [
    "COLOURS",
    "FG_THRESHOLD",
    "N_HELDOUT_PAIRS",
    "POSITIONS",
    "POSITIONS_V",
    "POS_JITTER",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SIZE_JITTER",
    "SIZE_SPLIT",
    "TWO_OBJECT_FRACTION",
    "VERSION",
    "Detection",
    "JudgeTally",
    "ObjectSpec",
    "Sample",
    "attribute_name",
    "caption_match",
    "cli_judge",
    "cli_shapes",
    "detect_objects",
    "generate_sample",
    "heldout_pairs",
    "judge_image",
    "judge_shards",
    "parse_caption",
    "write_shapes",
]
