"""The discrete VAE: stage 1 of DALL-E (Ramesh et al. 2021).

Architecture, parameter names and initialisation follow OpenAI's released dVAE code [C] (``dall_e/{utils,encoder,
decoder}.py``) so that their checkpoints' state dicts line up with ours; the objective (logit-Laplace likelihood,
Gumbel-softmax relaxation, KL to a uniform prior, loss divided by H·W·C) follows the paper [P §2.1, A.2, A.3].

Sources: [P] arXiv 2102.12092; [C] github.com/openai/DALL-E; [I#n] maintainer answers in that repository's issues.
This module is pure modelling: it imports nothing from ``torch.distributed``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_dist.config import DVAE_LIKELIHOODS, DVAEModelConfig, DVAEOptimConfig

LOGIT_LAPLACE_EPS = 0.1  # ε of the pixel map φ [P A.3]; `logit_laplace_eps` in [C utils.py]


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


class Conv2d(nn.Module):
    """Square same-padding convolution with OpenAI's parameter names and init [C utils.Conv2d].

    ``compute_dtype`` selects the arithmetic precision (None: the input's dtype). ``keep_fp32`` pins a conv to
    float32 regardless: [C] does this for the 8192-wide codebook-sized 1×1 convs (encoder output, decoder input),
    in line with the paper's rule of keeping vocabulary-sized projections in 32-bit [P D.2].
    """

    def __init__(self, n_in: int, n_out: int, kw: int, keep_fp32: bool = False) -> None:
        super().__init__()
        if n_in < 1 or n_out < 1:
            raise ValueError(f"Conv2d needs positive channel counts, got n_in={n_in}, n_out={n_out}")
        if kw < 1 or kw % 2 == 0:
            raise ValueError(f"Conv2d kernel width must be a positive odd number (same padding), got kw={kw}")
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.keep_fp32 = keep_fp32
        self.compute_dtype: torch.dtype | None = None
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw))  # (n_out, n_in, kw, kw)
        self.b = nn.Parameter(torch.empty(n_out))  # (n_out,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Fan-in scaled normal, zero bias [C utils.Conv2d]; also re-initialises a model materialised by to_empty.
        with torch.no_grad():
            self.w.normal_(0.0, 1.0 / math.sqrt(self.n_in * self.kw**2))
            self.b.zero_()

    def _dtype_for(self, x: Tensor) -> torch.dtype:
        if self.keep_fp32:
            return torch.float32
        return self.compute_dtype if self.compute_dtype is not None else x.dtype

    def forward(self, x: Tensor) -> Tensor:
        dtype = self._dtype_for(x)
        # [C] casts input and parameters together, so the conv runs entirely in one precision.
        w, b = self.w.to(dtype), self.b.to(dtype)
        return F.conv2d(x.to(dtype), w, b, padding=(self.kw - 1) // 2)  # (B, n_out, H, W)

    def extra_repr(self) -> str:
        return f"{self.n_in}, {self.n_out}, kw={self.kw}, keep_fp32={self.keep_fp32}"


def _res_path(n_in: int, n_hid: int, n_out: int, kernels: tuple[int, int, int, int]) -> nn.Sequential:
    """ReLU→conv four times, with [C]'s names ``relu_i``/``conv_i``; widths n_in→n_hid→n_hid→n_hid→n_out."""
    widths = (n_in, n_hid, n_hid, n_hid, n_out)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, kw in enumerate(kernels, start=1):
        layers[f"relu_{i}"] = nn.ReLU()
        layers[f"conv_{i}"] = Conv2d(widths[i - 1], widths[i], kw)
    return nn.Sequential(layers)


class _ResBlock(nn.Module):
    """out = id_path(x) + post_gain · res_path(x) [C encoder.EncoderBlock / decoder.DecoderBlock].

    post_gain = 1 / n_layers² is the paper's "multiplication of the outgoing activations from the encoder and decoder
    resblocks by a small constant" that keeps early training stable [P §2.1].
    """

    kernels: tuple[int, int, int, int]

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        if n_out % 4:
            raise ValueError(f"resblock width n_out={n_out} must be a multiple of 4 (hidden width is n_out // 4)")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.n_in, self.n_out, self.n_hid = n_in, n_out, n_out // 4
        self.post_gain = 1.0 / n_layers**2
        # 1×1 projection only where the width changes [P A.1]
        self.id_path: nn.Module = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = _res_path(n_in, self.n_hid, n_out, self.kernels)

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)  # (B, n_out, H, W)


class EncoderBlock(_ResBlock):
    """Encoder resblock: 3×3, 3×3, 3×3, then a 1×1 back to n_out [C encoder.py]."""

    kernels = (3, 3, 3, 1)


class DecoderBlock(_ResBlock):
    """Decoder resblock: 1×1 first, then 3×3, 3×3, 3×3 [C decoder.py]."""

    kernels = (1, 3, 3, 3)


def _check_float_4d(x: Tensor, channels: int, what: str) -> None:
    """Fail fast with a message naming the expected layout instead of an opaque conv error."""
    if x.ndim != 4:
        raise ValueError(f"{what} expects a 4-D (B, {channels}, H, W) tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{what} expects {channels} channels in dim 1, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{what} expects a floating-point tensor, got {x.dtype}")


def _groups(
    cfg: DVAEModelConfig,
    n_in: int,
    widths: list[int],
    block: type[_ResBlock],
    resample_name: str,
    resample: Callable[[], nn.Module],
) -> OrderedDict[str, nn.Module]:
    """``group_1`` … ``group_G`` of the encoder or decoder [C encoder.py, decoder.py]: group g holds resblocks
    ``block_1`` … ``block_{n_blk_per_group}`` of width ``widths[g-1]`` (the first one takes ``n_in`` channels), then
    ``resample_name``: ``resample()`` after every group but the last. The names are the state dict's, as in [C]."""
    n_layers = cfg.group_count * cfg.n_blk_per_group
    groups: OrderedDict[str, nn.Module] = OrderedDict()
    for g, width in enumerate(widths, start=1):
        group: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(1, cfg.n_blk_per_group + 1):
            group[f"block_{i}"] = block(n_in, width, n_layers)
            n_in = width
        if g < cfg.group_count:
            group[resample_name] = resample()
        groups[f"group_{g}"] = nn.Sequential(group)
    return groups


def _output(n_in: int, n_out: int, keep_fp32: bool = False) -> nn.Sequential:
    """The ``output`` stage of the encoder or decoder: ReLU, then a 1×1 conv [C]."""
    return nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv2d(n_in, n_out, 1, keep_fp32=keep_fp32)))


# --------------------------------------------------------------------------------------------------
# Encoder and decoder
# --------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Image → per-position logits over the codebook, (B, C, H, W) → (B, vocab, H/2^(G-1), W/2^(G-1)) [C].

    7×7 input conv, ``group_count`` groups of resblocks at widths n_hid·2^(g-1) with a 2×2 max-pool between groups
    (max-pool gives a better ELB than average pooling [P A.1]), then ReLU and a float32 1×1 conv to the vocabulary.
    """

    def __init__(self, cfg: DVAEModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        widths = [cfg.n_hid * 2**g for g in range(cfg.group_count)]  # n_hid·{1, 2, 4, 8} for 4 groups
        blocks: OrderedDict[str, nn.Module] = OrderedDict(input=Conv2d(cfg.input_channels, cfg.n_hid, 7))
        blocks.update(_groups(cfg, cfg.n_hid, widths, EncoderBlock, "pool", partial(nn.MaxPool2d, kernel_size=2)))
        # The codebook-sized projection stays in fp32 [C: use_float16=False].
        blocks["output"] = _output(widths[-1], cfg.vocab_size, keep_fp32=True)
        self.blocks = nn.Sequential(blocks)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: map_pixels'd images (B, C, H, W), float. Returns float32 logits (B, vocab, g, g)."""
        _check_float_4d(x, self.cfg.input_channels, "Encoder")
        factor = 2 ** (self.cfg.group_count - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"Encoder input H and W must be multiples of {factor}, got shape {tuple(x.shape)}")
        return self.blocks(x).float()  # (B, vocab, g, g)


class Decoder(nn.Module):
    """Relaxed one-hot codes → logit-Laplace statistics, (B, vocab, g, g) → (B, 2·C, H, W) [C].

    Float32 1×1 conv vocab→n_init (the implicit codebook [C]), ``group_count`` groups at widths n_hid·2^(G-g) with
    nearest-neighbour ×2 upsampling between groups [P A.1], then ReLU and a 1×1 conv to 2·C maps: μ then ln b [P A.3].
    """

    def __init__(self, cfg: DVAEModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        widths = [cfg.n_hid * 2 ** (cfg.group_count - g) for g in range(1, cfg.group_count + 1)]  # 8, 4, 2, 1 × n_hid
        blocks: OrderedDict[str, nn.Module] = OrderedDict(
            input=Conv2d(cfg.vocab_size, cfg.n_init, 1, keep_fp32=True)  # [C: use_float16=False]
        )
        upsample = partial(nn.Upsample, scale_factor=2, mode="nearest")
        blocks.update(_groups(cfg, cfg.n_init, widths, DecoderBlock, "upsample", upsample))
        blocks["output"] = _output(widths[-1], 2 * cfg.input_channels)
        self.blocks = nn.Sequential(blocks)

    def forward(self, z: Tensor) -> Tensor:
        """``z``: (relaxed) one-hot codes (B, vocab, g, g), float. Returns float32 stats (B, 2·C, H, W)."""
        _check_float_4d(z, self.cfg.vocab_size, "Decoder")
        return self.blocks(z).float()  # (B, 2·C, H, W); likelihood math happens in fp32 [P D.2]


# --------------------------------------------------------------------------------------------------
# Pixel map, likelihood, KL and relaxation
# --------------------------------------------------------------------------------------------------


def map_pixels(x: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    """φ: [0, 1] → [ε, 1−ε], so the logit-Laplace never sees the unbounded ends 0 and 1 [P A.3, C utils.py]."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    """φ⁻¹ clamped back to [0, 1] [C utils.py]."""
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


def logit_laplace_log_prob(x: Tensor, mu: Tensor, log_b: Tensor) -> Tensor:
    """Elementwise log f(x | μ, b) of the logit-Laplace on (0, 1), x already in (0, 1) [P A.3].

    f(x | μ, b) = exp(−|logit(x) − μ| / b) / (2·b·x(1−x)): a Laplace on logit(x) pushed through the sigmoid, whose
    Jacobian contributes the −log(x(1−x)) term. ``log_b`` is ln b, as the decoder emits it [P A.3].
    """
    log_x, log_1mx = torch.log(x), torch.log1p(-x)
    logit_x = log_x - log_1mx
    return -math.log(2.0) - log_b - log_x - log_1mx - torch.abs(logit_x - mu) * torch.exp(-log_b)


def gaussian_log_prob(x: Tensor, mean: Tensor, sigma: float) -> Tensor:
    """Elementwise log N(x | mean, σ²) with a fixed σ; x and mean in the same (mapped-pixel) units."""
    return -0.5 * ((x - mean) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)


def kl_to_uniform(logits: Tensor, dim: int = 1) -> Tensor:
    """KL(softmax(logits) ‖ Uniform(K)) = Σ q log q + log K, per position (``dim`` reduced) [P §2.1].

    log_softmax keeps q log q finite where q underflows to 0 (0 · finite = 0).
    """
    log_q = F.log_softmax(logits.float(), dim=dim)
    return (log_q.exp() * log_q).sum(dim=dim) + math.log(logits.shape[dim])


def gumbel_softmax_relaxation(
    logits: Tensor, tau: float, generator: torch.Generator | None = None, dim: int = 1
) -> Tensor:
    """softmax((logits + Gumbel noise) / τ) along ``dim``.

    The relaxed sample is used in both the forward and backward passes: no argmax, not straight-through [I#1].
    """
    if not tau > 0:
        raise ValueError(f"relaxation temperature must be > 0, got tau={tau}")
    finfo = torch.finfo(torch.float32)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    # Clamp away from 0 and 1 so −log(−log u) stays finite.
    u = u.clamp(min=finfo.tiny, max=1.0 - finfo.eps)
    gumbel = -torch.log(-torch.log(u))
    return F.softmax((logits.float() + gumbel) / tau, dim=dim)


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DVAEObjective:
    """What the relaxed ELB is made of. The defaults are the paper's [P §2.1, A.2, A.3].

    Two departures, off by default, make minute-long CPU runs on the synthetic shapes work (docs/dvae.md, "Objective
    options"), where the paper's objective collapses to a few codes that carry no colour:

    - ``likelihood="gaussian"``: log N(φ(x) | sigmoid(μ), σ²) with a fixed σ instead of the logit-Laplace. On images
      whose background is one exact value, the logit-Laplace's learned scale b shrinks there without bound, that
      term dominates the gradient, and the objects' colour, a median under an L1-type loss, comes out black.
    - ``usage_entropy_weight > 0``: subtracts w · H(q̄), q̄ the batch- and position-mean of the encoder's softmax,
      as wav2vec 2.0's codebook diversity loss does. The paper's per-position KL to uniform cannot stop every
      position choosing the same confident code; this term can.
    """

    likelihood: str = "logit_laplace"
    gaussian_sigma: float = 0.1
    usage_entropy_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.likelihood not in DVAE_LIKELIHOODS:
            raise ValueError(f"likelihood={self.likelihood!r}: choose one of {list(DVAE_LIKELIHOODS)}")
        if not self.gaussian_sigma > 0 or not self.usage_entropy_weight >= 0:
            raise ValueError(
                f"gaussian_sigma={self.gaussian_sigma} must be > 0 and usage_entropy_weight="
                f"{self.usage_entropy_weight} >= 0"
            )

    @classmethod
    def from_optim(cls, optim: DVAEOptimConfig) -> DVAEObjective:
        return cls(optim.likelihood, optim.gaussian_sigma, optim.usage_entropy_weight)


PAPER_OBJECTIVE = DVAEObjective()


# --------------------------------------------------------------------------------------------------
# The dVAE
# --------------------------------------------------------------------------------------------------


class DiscreteVAE(nn.Module):
    """Encoder + decoder + the relaxed ELB objective of [P §2.1, A.2]."""

    def __init__(self, cfg: DVAEModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def set_compute_dtype(self, dtype: torch.dtype | None) -> None:
        """Precision of every conv not pinned to fp32 (None: follow the input's dtype)."""
        for m in self.modules():
            if isinstance(m, Conv2d):
                m.compute_dtype = dtype

    def reset_parameters(self) -> None:
        """Re-initialise every conv, e.g. after ``to_empty`` on a model built on the meta device."""
        for m in self.modules():
            if isinstance(m, Conv2d):
                m.reset_parameters()

    def _check_images(self, x01: Tensor) -> None:
        _check_float_4d(x01, self.cfg.input_channels, "DiscreteVAE")

    def forward(
        self,
        x01: Tensor,
        temperature: float,
        kl_weight: float,
        generator: torch.Generator | None = None,
        objective: DVAEObjective = PAPER_OBJECTIVE,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Relaxed ELB loss on images ``x01`` in [0, 1], (B, C, H, W); returns (loss, detached metrics).

        loss = mean over batch of (−Σ_pixels,channels log p(x|z) + β · Σ_positions KL(q ‖ U)) / (H·W·C), which makes
        the effective KL weight β/192 at 256 px with a 32×32 grid [P A.2]. The likelihood is evaluated at φ(x); the
        Jacobian of φ is a constant and is left out. ``objective`` may swap the likelihood or add a code-usage
        entropy bonus (see :class:`DVAEObjective`); the default is the paper's.
        """
        self._check_images(x01)
        B, C, H, W = x01.shape
        dims = C * H * W
        x = map_pixels(x01.float())  # (B, C, H, W) in [ε, 1−ε]
        logits = self.encoder(x)  # (B, vocab, g, g), fp32
        z = gumbel_softmax_relaxation(logits, temperature, generator=generator)  # (B, vocab, g, g)
        stats = self.decoder(z)  # (B, 2C, H, W), fp32
        mu, log_b = stats[:, :C], stats[:, C:]  # (B, C, H, W) each [P A.3]
        if objective.likelihood == "logit_laplace":
            log_p = logit_laplace_log_prob(x, mu, log_b).sum(dim=(1, 2, 3))  # (B,)
        else:  # "gaussian": the ln b channels are left unused
            log_p = gaussian_log_prob(x, torch.sigmoid(mu), objective.gaussian_sigma).sum(dim=(1, 2, 3))  # (B,)
        # KL of the encoder's categorical itself, not of the relaxed sample, at every temperature [I#26].
        kl = kl_to_uniform(logits, dim=1)  # (B, g, g)
        loss = ((-log_p + kl_weight * kl.sum(dim=(1, 2))) / dims).mean()
        q_mean = F.softmax(logits, dim=1).mean(dim=(0, 2, 3))  # (vocab,) batch- and position-mean of q
        usage_entropy = -(q_mean * torch.log(q_mean.clamp_min(torch.finfo(q_mean.dtype).tiny))).sum()
        if objective.usage_entropy_weight > 0:
            loss = loss - objective.usage_entropy_weight * usage_entropy

        with torch.no_grad():
            recon = unmap_pixels(torch.sigmoid(mu))  # (B, C, H, W) in [0, 1]; ln b ignored [P A.3]
            metrics = {
                "loss": loss.detach(),
                "nll": (-log_p / dims).mean(),
                "kl": kl.mean(),
                "usage_entropy": usage_entropy.detach(),
                "recon_mse": F.mse_loss(recon, x01.float()),
                "codebook_usage": torch.tensor(float(logits.argmax(dim=1).unique().numel()), device=logits.device),
            }
        return loss, metrics

    @torch.no_grad()
    def encode_codes(self, x01: Tensor) -> Tensor:
        """Images in [0, 1] (B, C, H, W) → argmax codes (B, g, g), no noise; the prior's image tokens [P §2.2]."""
        self._check_images(x01)
        return self.encoder(map_pixels(x01)).argmax(dim=1)  # (B, g, g)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Codes (B, g, g) → images in [0, 1] (B, C, H, W) via one-hot → decoder → φ⁻¹(sigmoid(μ)) [C usage]."""
        if codes.ndim != 3 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"decode_codes expects integer codes (B, g, g), got {codes.dtype} {tuple(codes.shape)}")
        z = F.one_hot(codes.long(), self.cfg.vocab_size).permute(0, 3, 1, 2).float()  # (B, vocab, g, g)
        mu = self.decoder(z)[:, : self.cfg.input_channels]  # (B, C, H, W)
        return unmap_pixels(torch.sigmoid(mu))  # (B, C, H, W)

    def reconstruct(self, x01: Tensor) -> Tensor:
        """decode_codes(encode_codes(x01)): what the prior's tokens can represent."""
        return self.decode_codes(self.encode_codes(x01))
