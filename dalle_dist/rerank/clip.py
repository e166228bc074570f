"""A user-supplied open_clip checkpoint as the reranker, the paper's choice [P §2.6].

open_clip is optional (``pip install open_clip_torch``): it is not a dependency of this package because it
pulls in torchvision, whose wheels pin a torch version that would fight the one this project pins. Nothing is
downloaded: the weights come from a local file the user names, and the file is checked before open_clip is
even imported, so a typo in the path is reported as such and not as a missing package.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .model import to_nchw_uint8

DEFAULT_ARCH = "ViT-B-32"


class OpenClipScorer:
    """``score(images, captions)`` with an open_clip model: cosine similarity of normalised features."""

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, device: torch.device) -> None:
        self.model, self.preprocess, self.tokenizer, self.device = model.eval(), preprocess, tokenizer, device

    @torch.no_grad()
    def score(self, images: Tensor | np.ndarray, captions: list[str], chunk: int = 64) -> Tensor:
        """(N,) cosine similarity of image i with captions[i]; a single caption is compared with every image."""
        from PIL import Image

        x = to_nchw_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3) uint8 for PIL
        n = x.shape[0]
        if len(captions) not in (1, n):
            raise ValueError(f"{n} images need 1 or {n} captions, got {len(captions)}")
        out = []
        for start in range(0, n, chunk):
            # open_clip's own eval transform (resize, centre crop, its normalisation) expects PIL images.
            pix = torch.stack([self.preprocess(Image.fromarray(im)) for im in x[start : start + chunk]])
            img = F.normalize(self.model.encode_image(pix.to(self.device)).float(), dim=-1)  # (c, D)
            caps = captions if len(captions) == 1 else captions[start : start + chunk]
            txt = F.normalize(self.model.encode_text(self.tokenizer(caps).to(self.device)).float(), dim=-1)
            out.append((img * txt).sum(-1).cpu())  # (c,)
        return torch.cat(out)  # (N,)


def load_open_clip(path: str | Path, arch: str = DEFAULT_ARCH, device: str | torch.device = "cpu") -> OpenClipScorer:
    """An :class:`OpenClipScorer` from a local open_clip checkpoint ``path`` of architecture ``arch``.

    Raises FileNotFoundError (naming the path) when the file is absent, and ImportError telling how to install
    open_clip when the package is missing; the file is checked first.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"open_clip checkpoint {str(path)!r} not found: pass --clip with the path of a local open_clip weights "
            "file (nothing is downloaded)"
        )
    try:
        open_clip = importlib.import_module("open_clip")
    except ImportError as err:
        raise ImportError(
            f"--clip {str(path)!r} needs the optional package open_clip: pip install open_clip_torch "
            "(or use the built-in reranker: dalle-dist train-reranker)"
        ) from err
    dev = torch.device(device)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(path), device=dev)
    return OpenClipScorer(model, preprocess, open_clip.get_tokenizer(arch), dev)
