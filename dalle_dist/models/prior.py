"""The DALL-E prior: a decoder-only sparse transformer over text then image tokens [P §2.2, B.1].

Sequence (``T = text_len + grid²`` slots; see docs/prior.md): text slots are [BOS] caption... [SOI], image slots
hold the image tokens in raster order, and the output at slot s predicts the token at slot s + 1. Text and image
logits come from separate, untied unembeddings and are computed in fp32 [P D.2].

The model is three phases so a pipeline split can cut between resblocks: ``embed`` → ``resblocks`` (a ModuleDict
"0".."2L-1": even = attention, odd = MLP; each returns only its branch, the caller adds the residual) → ``head``.
Nothing here knows about parallelism or precision policies; those wrap the modules from outside.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_dist.config import PriorModelConfig
from dalle_dist.models.attention import Attention, KVCache, layer_kinds

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index


class PriorEmbedding(nn.Module):
    """Input embeddings of the text and image slots [P §2.2, B.1, Fig. 10]."""

    def __init__(self, cfg: PriorModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.text_tok = nn.Embedding(cfg.text_vocab, d)
        self.text_pos = nn.Parameter(torch.empty(cfg.text_len, d))
        # "a special padding token separately for each of the 256 text positions" [P §2.2]
        self.text_pad = nn.Parameter(torch.empty(cfg.text_len, d))
        self.bos = nn.Parameter(torch.empty(d)) if cfg.use_bos else None
        self.soi = nn.Parameter(torch.empty(d)) if cfg.use_soi else None
        self.image_tok = nn.Embedding(cfg.image_vocab, d)
        # "Each image vocabulary embedding is summed with a row and column embedding" [P B.1]
        self.row = nn.Parameter(torch.empty(cfg.grid, d))
        self.col = nn.Parameter(torch.empty(cfg.grid, d))

    def embed_text(self, text: Tensor) -> Tensor:
        """text (B, caption_len) caption ids, pad id where empty → (B, text_len, d)."""
        cfg = self.cfg
        if text.dim() != 2 or text.shape[1] != cfg.caption_len or text.dtype != torch.long:
            raise ValueError(
                f"text must be a (B, caption_len={cfg.caption_len}) long tensor; got {tuple(text.shape)} {text.dtype}"
            )
        b = text.shape[0]
        off = int(cfg.use_bos)  # slot of the first caption token
        pad = self.text_pad[off : off + cfg.caption_len]  # (L, d): the pad embedding of each caption slot
        caption = torch.where((text == cfg.text_pad_id)[..., None], pad, self.text_tok(text))  # (B, L, d)
        parts = [caption]
        if self.bos is not None:
            parts.insert(0, self.bos.expand(b, 1, -1))  # (B, 1, d)
        if self.soi is not None:
            parts.append(self.soi.expand(b, 1, -1))  # (B, 1, d)
        return torch.cat(parts, dim=1) + self.text_pos  # (B, text_len, d)

    def embed_image(self, image: Tensor, start: int = 0) -> Tensor:
        """image (B, n) tokens at raster positions start..start+n-1 → (B, n, d); used for incremental decoding."""
        grid = self.cfg.grid
        if image.dim() != 2 or image.dtype != torch.long:
            raise ValueError(f"image must be a (B, n) long tensor; got {tuple(image.shape)} {image.dtype}")
        if start < 0 or start + image.shape[1] > grid * grid:
            raise ValueError(f"image positions {start}..{start + image.shape[1] - 1} exceed grid²={grid * grid}")
        pos = torch.arange(start, start + image.shape[1], device=image.device)  # (n,)
        return self.image_tok(image) + self.row[pos // grid] + self.col[pos % grid]  # (B, n, d)

    def forward(self, text: Tensor, image: Tensor) -> Tensor:
        """text (B, caption_len), image (B, n) with n ≤ grid² (a prefix, possibly empty) → (B, text_len + n, d)."""
        if image.shape[0] != text.shape[0]:
            raise ValueError(f"text batch {text.shape[0]} != image batch {image.shape[0]}")
        return torch.cat([self.embed_text(text), self.embed_image(image)], dim=1)  # (B, text_len + n, d)


class AttentionResBlock(nn.Module):
    """Pre-LN attention branch f(x) = attn(ln(x)) [Child et al. 2019]; the caller adds the residual."""

    def __init__(self, cfg: PriorModelConfig, kind: str) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, kind, cfg.text_len, cfg.grid, cfg.conv_kernel)

    def forward(self, x: Tensor, start: int = 0, cache: KVCache | None = None) -> Tensor:
        return self.attn(self.ln(x), start=start, cache=cache)  # (B, T', d)


def fast_gelu(x: Tensor) -> Tensor:
    """x·sigmoid(1.702x), the blocksparse approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


class MLPResBlock(nn.Module):
    """Pre-LN MLP branch f(x) = fc2(act(fc1(ln(x)))), hidden mlp_ratio·d [P Table 2]; the caller adds the residual."""

    def __init__(self, cfg: PriorModelConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.fc1 = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
        self.activation = cfg.activation

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(self.ln(x))  # (B, T', 4d)
        h = F.gelu(h) if self.activation == "gelu" else fast_gelu(h)
        return self.fc2(h)  # (B, T', d)


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    # Autocast would run the unembedding matmul in 16 bits; the logits must be fp32 [P D.2].
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()  # e.g. meta


class PriorHead(nn.Module):
    """Final LayerNorm and the untied text / image unembeddings; logits in fp32 [P D.2]."""

    def __init__(self, cfg: PriorModelConfig) -> None:
        super().__init__()
        self.text_len = cfg.text_len
        self.seq_len = cfg.seq_len
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.text_unembed = nn.Linear(cfg.d_model, cfg.text_vocab)
        self.image_unembed = nn.Linear(cfg.d_model, cfg.image_vocab)

    def _logits(self, h: Tensor, unembed: nn.Linear) -> Tensor:
        with _autocast_off(h.device):
            return unembed(self.ln_f(h).float())  # (B, S, V) fp32

    def image_logits(self, h: Tensor) -> Tensor:
        """Image logits of any slots ≥ text_len - 1, e.g. the newest slot while decoding: (B, S, d) → (B, S, V_img)."""
        return self._logits(h, self.image_unembed)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h (B, S, d) for slots 0..S-1 → text logits (B, text_len-1, V_txt), image logits (B, m, V_img).

        Text logits come from slots 0..text_len-2; image logits from slots text_len-1..min(S-1, T-2), so image row
        j predicts z_j: m = grid² for the full sequence, n + 1 for a prefix holding n image tokens.
        """
        t = self.text_len
        text_logits = self._logits(h[:, : t - 1], self.text_unembed)  # (B, t-1, V_txt)
        image_logits = self._logits(h[:, t - 1 : self.seq_len - 1], self.image_unembed)  # (B, m, V_img)
        return text_logits, image_logits


def compute_loss(
    text_logits: Tensor, image_logits: Tensor, text_targets: Tensor, image_targets: Tensor, cfg: PriorModelConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted cross-entropy: text × 1/8 + image × 7/8, each averaged over its own tokens in the batch [P §2.2].

    text_logits (B, t-1, V_txt) with text_targets (B, t-1) (IGNORE_INDEX where no target); image_logits
    (B, n, V_img) with image_targets (B, n). A batch without text targets contributes 0 for text.
    """
    if image_logits.shape[:2] != image_targets.shape or text_logits.shape[:2] != text_targets.shape:
        raise ValueError(
            f"logits {tuple(text_logits.shape)}, {tuple(image_logits.shape)} do not match targets "
            f"{tuple(text_targets.shape)}, {tuple(image_targets.shape)}"
        )
    n_text = (text_targets != IGNORE_INDEX).sum()
    text_sum = F.cross_entropy(text_logits.flatten(0, 1).float(), text_targets.flatten(), reduction="sum")
    loss_text = text_sum / n_text.clamp(min=1)  # sum is 0 without targets; "mean" would give NaN
    loss_image = F.cross_entropy(image_logits.flatten(0, 1).float(), image_targets.flatten())
    loss = cfg.text_loss_weight * loss_text + cfg.image_loss_weight * loss_image
    metrics = {"loss": loss.detach(), "loss_text": loss_text.detach(), "loss_image": loss_image.detach()}
    return loss, metrics


def _param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


@torch.no_grad()
def init_prior_parameters(named_params: Iterable[tuple[str, nn.Parameter]], cfg: PriorModelConfig, seed: int) -> None:
    """Initialise prior parameters by name (full-model names: ``embed.*``, ``resblocks.K.*``, ``head.*``).

    Weight matrices and token embeddings N(0, init_std); ``out_proj`` and ``fc2`` weights also × 1/√(2·n_layers)
    when resid_init == "sqrt_2n" (Child et al. 2019 §5.2); Linear biases 0; LayerNorm gain 1, bias 0; position,
    row, column, pad and start embeddings N(0, pos_init_std).
    """
    resid_scale = 1 / math.sqrt(2 * cfg.n_layers) if cfg.resid_init == "sqrt_2n" else 1.0
    for name, p in named_params:
        if p.is_meta:
            continue
        leaf = name.rsplit(".", 1)[-1]
        is_norm = ".ln." in f".{name}" or ".ln_f." in f".{name}"
        if is_norm:
            p.fill_(1.0 if leaf == "weight" else 0.0)
            continue
        if leaf == "bias":
            p.zero_()
            continue
        if name.startswith("embed.") and not name.endswith("_tok.weight"):
            std = cfg.pos_init_std  # text_pos, text_pad, bos, soi, row, col
        else:
            std = cfg.init_std
            if name.endswith(("out_proj.weight", "fc2.weight")):
                std *= resid_scale
        g = torch.Generator(device=p.device).manual_seed(_param_seed(seed, name))
        p.normal_(0.0, std, generator=g)


class DallePrior(nn.Module):
    """Text-to-image-token transformer: ``embed`` → ``resblocks`` → ``head`` [P §2.2, B.1]."""

    def __init__(self, cfg: PriorModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        # Drawn before any submodule exists, so the weights depend on torch's RNG state at construction only —
        # not on the device (meta or real) the submodules are built on.
        self.init_seed = int(torch.randint(0, 2**31 - 1, (), device="cpu"))
        self.embed = PriorEmbedding(cfg)
        self.resblocks = nn.ModuleDict()
        for layer, kind in enumerate(layer_kinds(cfg.n_layers, cfg.attn_layout)):
            # Each attention and each MLP block is its own resblock: 128 for 64 layers [P App. D.1].
            self.resblocks[str(2 * layer)] = AttentionResBlock(cfg, kind)
            self.resblocks[str(2 * layer + 1)] = MLPResBlock(cfg)
        self.head = PriorHead(cfg)
        self.init_weights()

    def init_weights(self, seed: int | None = None) -> None:
        """Sparse-Transformer-style init (the paper gives none for DALL-E; see docs/prior.md).

        Every parameter is drawn from its own generator seeded by (seed, parameter name), so a pipeline stage or a
        parameter shard that initialises only its own parameters gets exactly the values the whole model would:
        runs on any topology start from the same weights. ``seed`` None uses the seed drawn at construction, so
        ``torch.manual_seed`` before construction still decides. A no-op on meta tensors; call again after
        ``to_empty``.
        """
        if seed is None:
            seed = self.init_seed
        self.init_seed = seed
        init_prior_parameters(self.named_parameters(), self.cfg, seed)

    def forward(self, text: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        """text (B, caption_len), image (B, n) → text logits (B, text_len-1, V_txt), image logits (B, m, V_img).

        Both fp32. Image row j predicts z_j; m = grid² when image is complete, n + 1 for a prefix of n tokens.
        """
        h = self.embed(text, image)  # (B, S, d)
        for block in self.resblocks.values():
            h = h + block(h)  # residual add here, so the branch alone can be wrapped [P Fig. 4]
        return self.head(h)

    def targets(self, text: Tensor) -> Tensor:
        """Text targets (B, text_len-1): slot s predicts the caption token in slot s+1; IGNORE_INDEX at pad/SOI."""
        cfg = self.cfg
        b = text.shape[0]
        off = int(cfg.use_bos)
        slots = text.new_full((b, cfg.text_len), IGNORE_INDEX)  # (B, text_len): target value of each text slot
        slots[:, off : off + cfg.caption_len] = text.masked_fill(text == cfg.text_pad_id, IGNORE_INDEX)
        return slots[:, 1:]  # (B, text_len-1)

    def loss(self, text: Tensor, image: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Training loss of a batch of complete pairs: text (B, caption_len), image (B, grid²)."""
        if image.shape[1] != self.cfg.image_len:
            raise ValueError(f"loss needs all {self.cfg.image_len} image tokens; got {image.shape[1]}")
        text_logits, image_logits = self(text, image)
        return compute_loss(text_logits, image_logits, self.targets(text), image, self.cfg)

    def new_kv_caches(self, batch: int) -> dict[str, KVCache]:
        """One empty KV cache per attention resblock, keyed by its resblock key (survives pipeline splits)."""
        cfg = self.cfg
        return {
            key: KVCache(batch, cfg.n_heads, cfg.seq_len, cfg.head_dim)
            for key, block in self.resblocks.items()
            if isinstance(block, AttentionResBlock)
        }

    def forward_incremental(self, h: Tensor, start: int, caches: dict[str, KVCache]) -> Tensor:
        """Embedded slots start..start+T'-1 (B, T', d) through every resblock, extending the caches → (B, T', d).

        Returns the final hidden states before the head; ``head.image_logits(out[:, -1:])`` gives the next token's
        logits. Slots before ``start`` must already be in the caches.
        """
        for key, block in self.resblocks.items():
            if isinstance(block, AttentionResBlock):
                h = h + block(h, start=start, cache=caches[key])
            else:
                h = h + block(h)
        return h


def effective_params(model: DallePrior) -> int:
    """The paper's "effective parameter count" = 12·L·d² [P Table 1]: resblock weight matrices only.

    Counts q, k, v, out_proj, fc1 and fc2 weights; excludes biases, LayerNorms, embeddings and unembeddings.
    """
    return sum(m.weight.numel() for m in model.resblocks.modules() if isinstance(m, nn.Linear))
