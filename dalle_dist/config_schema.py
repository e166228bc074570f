"""The config schema: one dataclass per concern, with its checks, and the named model flavors.

Loading (flavor → YAML → dotted overrides) is in :mod:`dalle_dist.config`, which re-exports every name here;
import them from there (``from dalle_dist.config import PriorRunConfig``).
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A configuration the user must fix; the message says how."""


# --------------------------------------------------------------------------------------------------
# Model configs
# --------------------------------------------------------------------------------------------------


@dataclass
class DVAEModelConfig:
    """Shape of the discrete VAE; defaults are the ``tiny`` flavor. ``openai`` is exactly [C]."""

    flavor: str = "tiny"  # name of the preset this config started from (informational once built)
    image_size: int = 64  # input side in pixels; the paper uses 256 [P §2.1]
    input_channels: int = 3  # RGB
    group_count: int = 4  # resolution groups; 3 max-pools → image_size / 8 token grid [C]
    n_hid: int = 16  # encoder width of group 1 (doubles per group); openai: 256 [C]
    n_blk_per_group: int = 1  # resblocks per group; openai: 2 [C]
    n_init: int = 32  # decoder width after the 8192→n_init codebook conv; openai: 128 [C]
    vocab_size: int = 512  # number of codes; the paper uses 8192 [P §2.1]

    @property
    def grid(self) -> int:
        """Side of the token grid: one max-pool between consecutive groups."""
        return self.image_size // 2 ** (self.group_count - 1)

    def validate(self) -> None:
        if self.group_count < 1 or self.n_blk_per_group < 1:
            raise ConfigError("model.group_count and model.n_blk_per_group must be >= 1")
        if self.n_hid % 4 or self.n_init < 1 or self.vocab_size < 2:
            raise ConfigError("model.n_hid must be a multiple of 4; model.n_init >= 1; model.vocab_size >= 2")
        if self.image_size % 2 ** (self.group_count - 1):
            raise ConfigError(
                f"model.image_size={self.image_size} is not divisible by 2**(group_count-1)="
                f"{2 ** (self.group_count - 1)}; pick a multiple, e.g. {2 ** (self.group_count - 1) * 8}"
            )


DVAE_FLAVORS: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=64, group_count=4, n_hid=16, n_blk_per_group=1, n_init=32, vocab_size=512),
    "openai": dict(image_size=256, group_count=4, n_hid=256, n_blk_per_group=2, n_init=128, vocab_size=8192),
}


ATTN_LAYOUTS: tuple[str, ...] = ("paper", "dense")  # PriorModelConfig.attn_layout; models.attention.layer_kinds


@dataclass
class PriorModelConfig:
    """Shape of the sparse-transformer prior; defaults are the ``tiny`` flavor.

    Layout choices where the paper is silent [P §2.2, Fig. 10] are documented in docs/prior.md.
    """

    flavor: str = "tiny"
    n_layers: int = 4  # attention layers; each has an attention and an MLP resblock [P B.1]
    d_model: int = 64  # residual width; 12B: 62 heads × 64 = 3968 [P B.1]
    n_heads: int = 4  # attention heads; head dim = d_model / n_heads
    mlp_ratio: int = 4  # MLP hidden = mlp_ratio · d_model [P Table 2]
    text_len: int = 32  # text positions, start tokens included; paper: 256 [P §2.2]
    text_vocab: int = 512  # BPE vocabulary; paper: 16,384 [P §2.2]; id text_pad_id is padding
    text_pad_id: int = 0  # caption id that means "no token here": the per-position pad embedding is used
    grid: int = 8  # image token grid side; paper: 32 [P §2.2]
    image_vocab: int = 512  # dVAE codes; paper: 8192
    conv_kernel: int = 11  # side of the conv mask neighbourhood in the last layer [P B.1]
    use_bos: bool = True  # learned start-of-text token in text slot 0 (Sparse Transformer default)
    use_soi: bool = True  # learned start-of-image token in the last text slot [P §2.2]
    activation: str = "gelu"  # "gelu" (exact) or "fast_gelu" (x·sigmoid(1.702x), blocksparse)
    ln_eps: float = 1e-5  # LayerNorm epsilon (blocksparse default)
    init_std: float = 0.02  # N(0, init_std) for weight matrices and token embeddings
    pos_init_std: float = 0.01  # position / row / column / pad embeddings
    resid_init: str = "sqrt_2n"  # output-projection scale: "sqrt_2n" (1/√(2N), Child et al. §5.2) | "none"
    text_loss_weight: float = 1 / 8  # [P §2.2]
    image_loss_weight: float = 7 / 8  # [P §2.2]
    attn_backend: str = "sdpa"  # attention kernel: "sdpa" (dense boolean mask); FlexAttention seam later
    attn_layout: str = "paper"  # mask per layer: "paper" (row/column, conv last [P B.1]) or "dense" (all causal)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def image_len(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len

    @property
    def caption_len(self) -> int:
        """Caption tokens that fit: the text slots less the start tokens."""
        return self.text_len - int(self.use_bos) - int(self.use_soi)

    def validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                f"e.g. n_heads={max(1, self.d_model // 64)} gives head dim 64"
            )
        if self.n_layers < 1 or self.grid < 1 or self.text_len < 1:
            raise ConfigError("model.n_layers, model.grid and model.text_len must be >= 1")
        if self.caption_len < 1:
            raise ConfigError(
                f"model.text_len={self.text_len} leaves no room for caption tokens after the start tokens "
                f"(use_bos={self.use_bos}, use_soi={self.use_soi}); raise model.text_len"
            )
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ConfigError(f"model.conv_kernel={self.conv_kernel} must be a positive odd number (paper: 11)")
        if self.activation not in ("gelu", "fast_gelu"):
            raise ConfigError(f"model.activation={self.activation!r}: choose 'gelu' or 'fast_gelu'")
        if self.resid_init not in ("sqrt_2n", "none"):
            raise ConfigError(f"model.resid_init={self.resid_init!r}: choose 'sqrt_2n' or 'none'")
        if self.attn_layout not in ATTN_LAYOUTS:
            raise ConfigError(
                f"model.attn_layout={self.attn_layout!r}: choose one of {list(ATTN_LAYOUTS)} "
                "('paper': row/column masks with a conv layer last; 'dense': every layer causal)"
            )
        if self.attn_backend not in ("sdpa",):
            raise ConfigError(f"model.attn_backend={self.attn_backend!r}: only 'sdpa' is available")
        if not 0 <= self.text_pad_id < self.text_vocab:
            raise ConfigError(f"model.text_pad_id={self.text_pad_id} must lie in [0, text_vocab={self.text_vocab})")


def _paper_prior(d_model: int) -> dict[str, Any]:
    """A Table 1 configuration: 64 layers, head dim 64, full sequence and vocabularies [P B.1, Table 1]."""
    return dict(
        n_layers=64, d_model=d_model, n_heads=d_model // 64, text_len=256, text_vocab=16384, grid=32, image_vocab=8192
    )


PRIOR_FLAVORS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layers=4, d_model=64, n_heads=4, text_len=32, text_vocab=512, grid=8, image_vocab=512),
    # One GPU: 16 layers × 768 wide at the paper's sequence and vocabularies (≈113M effective).
    "small": dict(n_layers=16, d_model=768, n_heads=12, text_len=256, text_vocab=16384, grid=32, image_vocab=8192),
    # 12·64·1280² = 1.26e9: the 64-layer width closest to 1.3B with head dim 64.
    "1.3B": _paper_prior(1280),
    "2.8B": _paper_prior(1920),
    "5.6B": _paper_prior(2688),
    "12B": _paper_prior(3968),  # 62 heads × 64 [P B.1]
}


# --------------------------------------------------------------------------------------------------
# Optimization, schedules, data, training loop
# --------------------------------------------------------------------------------------------------


@dataclass
class DVAEOptimConfig:
    """AdamW and the three cosine schedules of [P A.2]; lengths scale with ``schedule_scale``."""

    lr: float = 1e-4  # peak step size [P A.2]
    lr_final: float = 1.25e-6  # [P A.2]
    lr_steps: int = 1_200_000  # cosine length [P A.2]; held at lr_final after
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    kl_weight: float = 6.6  # β after the ramp [P A.2]
    kl_warmup_steps: int = 5_000  # β cosine 0 → kl_weight [P A.2]
    temp_start: float = 1.0  # τ cosine 1 → 1/16 [P A.2]
    temp_final: float = 1 / 16
    temp_steps: int = 150_000
    schedule_scale: float = 1.0  # multiplies lr_steps, kl_warmup_steps and temp_steps (short runs)
    ema_decay: float = 0.999  # iterate averaging [P A.2]
    ema_every: int = 1  # EMA update period in steps
    grad_clip: float = 0.0  # global-norm clip; 0 disables (the paper names none for the dVAE)
    # The objective: the paper's by default. The two departures exist for minute-long runs on the synthetic set,
    # where the logit-Laplace's learned scale shrinks without bound on the exactly-black background and the
    # codes collapse (docs/dvae.md, "Objective options"; configs/demo/dvae.yaml).
    likelihood: str = "logit_laplace"  # "logit_laplace" [P A.3] | "gaussian" (fixed σ on the mapped pixels)
    gaussian_sigma: float = 0.1  # σ of the "gaussian" likelihood, in mapped-pixel units
    usage_entropy_weight: float = 0.0  # bonus on the entropy of the batch-mean code distribution; 0 = paper

    def validate(self) -> None:
        if self.likelihood not in DVAE_LIKELIHOODS:
            raise ConfigError(
                f"optim.likelihood={self.likelihood!r}{_suggest(self.likelihood, DVAE_LIKELIHOODS)}: choose one of "
                f"{list(DVAE_LIKELIHOODS)} (logit_laplace is the paper's [P A.3])"
            )
        if not self.gaussian_sigma > 0:
            raise ConfigError(f"optim.gaussian_sigma={self.gaussian_sigma} must be > 0 (0.1 is a good start)")
        if not self.usage_entropy_weight >= 0:
            raise ConfigError(
                f"optim.usage_entropy_weight={self.usage_entropy_weight} must be >= 0 (0 disables it, as in the paper)"
            )


DVAE_LIKELIHOODS: tuple[str, ...] = ("logit_laplace", "gaussian")


@dataclass
class PriorOptimConfig:
    """AdamW with warmup then halving on plateau [P B.2]."""

    lr: float = 4.5e-4
    warmup_steps: int = 5_000  # linear warmup [P B.2]
    betas: tuple[float, float] = (0.9, 0.96)
    eps: float = 1e-8
    weight_decay: float = 4.5e-2
    grad_clip: float = 4.0  # global norm [P B.2]
    max_halvings: int = 5  # LR halved on plateau at most this many times [P B.2]
    plateau_patience: int = 2_000  # steps without a new best smoothed loss before halving
    plateau_smoothing: float = 0.99  # EMA factor of the loss tracked for plateaus
    plateau_min_delta: float = 1e-3  # relative improvement that counts as progress
    ema_decay: float = 0.99  # [P B.2]
    ema_every: int = 25  # [P B.2]
    # Optional cosine decay after warmup, for runs too short to plateau (the demo's). 0 = off, the paper's rule:
    # the paper only halves on plateaus [P B.2]; the halvings still apply on top of the cosine when it is on.
    lr_steps: int = 0  # the cosine reaches lr_final at this step and holds it after
    lr_final: float = 0.0

    def validate(self) -> None:
        if self.lr_steps < 0:
            raise ConfigError(f"optim.lr_steps={self.lr_steps} must be >= 0 (0 keeps the paper's plateau halving only)")
        if self.lr_steps and self.lr_steps <= self.warmup_steps:
            raise ConfigError(
                f"optim.lr_steps={self.lr_steps} must be greater than optim.warmup_steps={self.warmup_steps}: the "
                "cosine decay starts where warmup ends (e.g. set optim.lr_steps to train.steps)"
            )
        if not 0 <= self.lr_final <= self.lr:
            raise ConfigError(f"optim.lr_final={self.lr_final} must lie in [0, optim.lr={self.lr}]")


@dataclass
class DataConfig:
    """Where batches come from and how they are prepared [P §2.2, §2.3, App. C; Listings 1-2]."""

    source: str = (
        "random"  # "random" | "folder" (NAME.jpg + NAME.txt) | "shards" (webdataset) | "tokens" (pretokenized)
    )
    path: str = ""  # folder for source=folder
    shards: str = ""  # shard paths for source=shards/tokens: brace pattern(s), comma-separated, e.g. d/{000..009}.tar
    tokenizer: str = ""  # HF tokenizers BPE JSON (dalle-dist tokenizer train); empty: the byte-level stand-in
    bpe_dropout: float = 0.1  # BPE dropout while training the prior [P §2.2 fn 5]; never at eval
    batch_size: int = 8
    num_workers: int = 0
    dvae_checkpoint: str = ""  # prior on a folder: dVAE checkpoint whose encoder's argmax codes are the image tokens
    seed: int = 0
    # Shard sources (docs/data.md): within-shard shuffle and the filters of [P App. C].
    shuffle_buffer: int = 1000  # seeded within-shard shuffle buffer in samples; 0 keeps the tar order
    min_caption_words: int = 2  # captions with fewer words are skipped as caption_too_short [P App. C]
    max_caption_chars: int = 4096  # longer "captions" (page text, junk) are skipped as caption_too_long
    min_image_side: int = 0  # short side below this is skipped as image_too_small; 0: half the output side
    max_image_pixels: int = 0  # w·h above this is skipped as decompression_bomb; 0: PIL.Image.MAX_IMAGE_PIXELS
    max_aspect_ratio: float = 2.0  # long/short side above this is skipped: ratios outside [1/2, 2] [P App. C]
    filters: str = "dalle_dist.data.preprocess:boilerplate_filter"  # caption filters "module:function", comma-sep.


@dataclass
class TrainConfig:
    """The loop: length, logging, checkpoints, device."""

    steps: int = 100
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda"
    resume: bool = True  # continue from the latest complete checkpoint in out_dir when there is one
    keep_checkpoints: int = 3  # the prior, any topology: complete checkpoints in out_dir/checkpoints (0 keeps all)
    progress: bool = True  # tqdm progress bar
    wandb: str = "offline"  # "offline" | "online" | "disabled"; the WANDB_MODE environment variable wins
    peak_flops: float = 0.0  # per-device peak FLOP/s for the MFU estimate (H100/H200 bf16 dense: 989e12); 0: none


@dataclass
class PrecisionConfig:
    """Numerics policy [P §2.4, App. D]: storage dtype, per-resblock gradient scaling, activation checkpointing."""

    dtype: str = "fp32"  # "fp32" | "fp16" | "bf16": dtype of the weight matrices and activations
    grad_scaling: str = "per_resblock"  # "per_resblock" | "none"; only fp16 scales (dVAE: one global scale [P A.2])
    init_scale_log2: float = 13.0  # initial scale M·2^13 (M = data-parallel replicas) [P D.1]
    min_scale_log2: float = 7.0  # clamp to [M·2^7, M·2^24] [P D.1]
    max_scale_log2: float = 24.0
    growth_log2: float = 1e-3  # ×2^(1/1000) per update with finite gradients [P D.1]
    backoff: float = 2**0.5  # ÷√2 on a nonfinite gradient [P D.1]
    backoff_window: int = 125  # no two divisions of the same scale within this many updates [P D.1]
    activation_checkpointing: bool = False  # recompute resblock activations in the backward pass [P §2.4]
    master_weights: bool = False  # fp32 master copy of 16-bit weights in the optimizer; paper: none (spec §3)
    # Adam moments of the 16-bit weights (fp32 weights always keep fp32 moments): "bf16" (default: 4 B per
    # parameter as the paper's 16-bit 1-6-9 / 0-6-10 formats, with a wide exponent like theirs [P B.2]) | "fp32"
    moments_dtype: str = "bf16"

    def validate(self) -> None:
        if self.dtype not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"precision.dtype={self.dtype!r}: choose 'fp32', 'fp16' or 'bf16'")
        if self.moments_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"precision.moments_dtype={self.moments_dtype!r}: choose 'fp32' or 'bf16'")
        if self.grad_scaling not in ("per_resblock", "none"):
            raise ConfigError(f"precision.grad_scaling={self.grad_scaling!r}: choose 'per_resblock' or 'none'")
        if not self.min_scale_log2 <= self.init_scale_log2 <= self.max_scale_log2:
            raise ConfigError(
                f"precision scales need min_scale_log2 <= init_scale_log2 <= max_scale_log2; got "
                f"{self.min_scale_log2} <= {self.init_scale_log2} <= {self.max_scale_log2} (paper: 7 <= 13 <= 24)"
            )
        if self.growth_log2 < 0 or self.backoff <= 1 or self.backoff_window < 0:
            raise ConfigError(
                f"precision needs growth_log2 >= 0, backoff > 1, backoff_window >= 0; got {self.growth_log2}, "
                f"{self.backoff}, {self.backoff_window} (paper: 1e-3, √2, 125)"
            )


@dataclass
class CommConfig:
    """Gradient reduction across data-parallel replicas [P §2.5, App. E]."""

    replica_reduce: str = "allreduce"  # "allreduce" | "powersgd"
    powersgd_rank: int = 0  # total rank r; 0: use powersgd_rank_fraction
    powersgd_rank_fraction: float = 896 / 3968  # r as a fraction of d_model (12B: 896 [P Table 1])
    powersgd_eps: float = 1e-6  # ε·I added before Householder orthogonalization [P E.2(5)]
    powersgd_seed: int = 0  # seed of the fixed Gaussian Q [P §2.5 fn 10]
    powersgd_min_compression_rate: float = 1.0  # compress a matrix only if r·(m+n)·this < m·n (0: all matrices)

    def validate(self) -> None:
        if self.replica_reduce not in ("allreduce", "powersgd"):
            raise ConfigError(f"comm.replica_reduce={self.replica_reduce!r}: choose 'allreduce' or 'powersgd'")
        if self.powersgd_rank < 0 or (self.powersgd_rank == 0 and not 0 < self.powersgd_rank_fraction <= 1):
            raise ConfigError(
                f"comm.powersgd_rank={self.powersgd_rank} must be > 0, or 0 with 0 < comm.powersgd_rank_fraction "
                f"<= 1 (got {self.powersgd_rank_fraction}); the 12B model uses 896 [P Table 1]"
            )
        if self.powersgd_eps < 0 or self.powersgd_min_compression_rate < 0:
            raise ConfigError("comm.powersgd_eps and comm.powersgd_min_compression_rate must be >= 0")


@dataclass
class ParallelConfig:
    """Process layout under torchrun (``-m dalle_dist.launch`` or ``launch/run.py``; docs/distributed.md)."""

    topology: str = "pp=1,replicate=1,shard=1"  # pp × replicate × shard must equal the world size
    n_microbatches: int = 1  # pipeline microbatches per step (pp > 1); must divide the per-rank batch
    schedule: str = "1f1b"  # "1f1b" | "interleaved1f1b" | "gpipe"
    virtual_stages: int = 1  # stages per pp rank (interleaved1f1b)
    # pp > 1 with shard > 1: "step" (torch's pipelining: every stage stays all-gathered, its gradients unsharded,
    # until the last microbatch) | "microbatch" (reshard and reduce-scatter after every microbatch's backward:
    # less memory, one reduce-scatter per microbatch; docs/distributed.md)
    pp_reshard: str = "step"
    # FSDP2 shard dim of the second MLP matrix (d, 4d): 1 cuts it along 4d as the paper does [P Table 2], which
    # PowerSGD compresses better (1 − 5r/(8d) per GPU against 1 − 27r/(4d) for 0); other matrices shard dim 0, and
    # so does fc2 where 4d does not divide over the shards (FSDP2 cuts only dim 0 unevenly)
    fc2_shard_dim: int = 1
    backend: str = "auto"  # "auto" (nccl with CUDA, else gloo) | "gloo" | "nccl"


class _RunConfig:
    """What both run configs share: every section's own checks in field order, then data × train, then the stage's."""

    data: DataConfig
    train: TrainConfig

    def validate(self) -> None:
        for f in fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        _validate_common(self.data, self.train)
        self._validate_stage()

    def _validate_stage(self) -> None:
        """Checks that span sections of one stage; none by default."""


@dataclass
class DVAERunConfig(_RunConfig):
    """Stage 1 [P §2.1]: the discrete VAE, in one process or data-parallel."""

    model: DVAEModelConfig = field(default_factory=DVAEModelConfig)
    optim: DVAEOptimConfig = field(default_factory=DVAEOptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)


@dataclass
class PriorRunConfig(_RunConfig):
    """Stage 2 [P §2.2]: the transformer prior; ``comm`` and ``parallel`` lay it out over processes
    (docs/distributed.md)."""

    model: PriorModelConfig = field(default_factory=PriorModelConfig)
    optim: PriorOptimConfig = field(default_factory=PriorOptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def _validate_stage(self) -> None:
        if self.data.source == "folder" and not self.data.dvae_checkpoint:
            raise ConfigError(
                "data.source=folder for the prior needs a trained dVAE to turn images into tokens: "
                "pass --data.dvae_checkpoint runs/dvae/checkpoint.pt"
            )


def _validate_common(data: DataConfig, train: TrainConfig) -> None:
    if data.source not in ("random", "folder", "shards", "tokens"):
        raise ConfigError(f"data.source={data.source!r}: choose 'random', 'folder', 'shards' or 'tokens'")
    if data.source == "folder" and not data.path:
        raise ConfigError("data.source=folder needs --data.path DIR (images with same-stem .txt captions)")
    if data.source in ("shards", "tokens") and not data.shards:
        what = "image/caption shards, img2dataset layout" if data.source == "shards" else "pretokenize output"
        raise ConfigError(
            f"data.source={data.source} needs --data.shards, e.g. 'data/{{000000..000009}}.tar' or a directory of "
            f".tar files ({what})"
        )
    if data.num_workers < 0 or data.shuffle_buffer < 0 or data.min_caption_words < 0:
        raise ConfigError("data.num_workers, data.shuffle_buffer and data.min_caption_words must be >= 0")
    if data.min_image_side < 0 or data.max_image_pixels < 0 or data.max_caption_chars < 1:
        raise ConfigError("data.min_image_side and data.max_image_pixels must be >= 0, data.max_caption_chars >= 1")
    if not data.max_aspect_ratio >= 1:
        raise ConfigError(f"data.max_aspect_ratio={data.max_aspect_ratio} must be >= 1 (the paper keeps [1/2, 2]: 2)")
    for spec in (s.strip() for s in data.filters.split(",")):
        if spec and not (":" in spec or "." in spec):
            raise ConfigError(f"data.filters entry {spec!r} is not an import path like 'mypkg.filters:english_only'")
    if data.batch_size < 1 or train.steps < 0:
        raise ConfigError("data.batch_size must be >= 1 and train.steps >= 0")
    if train.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device={train.device!r}: choose 'auto', 'cpu' or 'cuda'")


RUN_CONFIGS: dict[str, type] = {"dvae": DVAERunConfig, "prior": PriorRunConfig}
FLAVORS: dict[str, dict[str, dict[str, Any]]] = {"dvae": DVAE_FLAVORS, "prior": PRIOR_FLAVORS}


def model_config(stage: str, flavor: str) -> DVAEModelConfig | PriorModelConfig:
    """The model config of a named flavor, e.g. ``model_config("prior", "12B")``."""
    presets = FLAVORS[stage]
    if flavor not in presets:
        raise ConfigError(
            f"unknown {stage} flavor {flavor!r}{_suggest(flavor, presets)}; choose one of {list(presets)}"
        )
    cls = DVAEModelConfig if stage == "dvae" else PriorModelConfig
    return cls(flavor=flavor, **presets[flavor])


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
