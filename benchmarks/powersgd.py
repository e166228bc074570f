"""PowerSGD figures: bytes per step at the paper's ranks, compression time vs backward, orthogonality errors.

    .venv/bin/python benchmarks/powersgd.py            # prints one JSON object (about 20 s on a CPU)

- Bytes: Table 2's accounting [P E.1, Table 2] for the prior's resblock matrices, per GPU and step, with 8 shards
  per machine and 16-bit P/Q and gradients. Ranks are Table 1's (2.8B: 512, 5.6B: 640, 12B: 896); the paper
  gives none for 1.3B, so 384 (0.3·d, a multiple of 128, following Table 1's rising r/d for smaller models) is
  our choice. The fp32 parameters (gains, biases, embeddings, unembeddings [P D.2]) are sent uncompressed in
  both cases and reported separately.
- Time: the tiny prior in one process (a single replica: the reducer skips the collectives), median of
  ``--repeats`` backward passes vs median ``PowerSGDReducer.reduce`` calls at the config's default rank.
- Orthogonality: max |QᵀQ − I| on an ill-conditioned P (condition number 1e6), Householder vs the
  Gram-Schmidt of torch's ``powerSGD_hook``.
"""

import argparse
import json
import statistics
import time

import torch
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _orthogonalize_gram_schmidt

from dalle_dist.config import CommConfig, model_config
from dalle_dist.models.prior import DallePrior
from dalle_dist.parallel.householder import householder_orthogonalize, ill_conditioned, orthogonality_error
from dalle_dist.parallel.powersgd import (
    PowerSGDReducer,
    compression_plan,
    plain_allreduce,
    powersgd_bytes,
    resblock_shapes,
    resolve_rank,
)

PAPER_RANKS = {"1.3B": 384, "2.8B": 512, "5.6B": 640, "12B": 896}  # 1.3B: our choice (see above)


def fp32_param_count(flavor: str) -> int:
    """Gains, biases, embeddings and unembeddings of a flavor, counted on the meta device."""
    with torch.device("meta"):
        model = DallePrior(model_config("prior", flavor))
    shapes = {n: p.shape for n, p in model.named_parameters()}
    _, rest = compression_plan(shapes, rank=1)
    return sum(shapes[n].numel() for n in rest)


def bytes_figures(shards: int) -> dict[str, dict[str, float]]:
    out = {}
    for flavor, rank in PAPER_RANKS.items():
        cfg = model_config("prior", flavor)
        d = cfg.d_model
        fig = powersgd_bytes(resblock_shapes(d, cfg.n_layers, cfg.mlp_ratio), rank, shards=shards, bytes_per_el=2)
        fp32 = 4 * fp32_param_count(flavor) / shards  # sharded too, sent uncompressed in fp32 [P D.2]
        out[flavor] = {
            "d_model": d,
            "rank": rank,
            "rank_per_gpu": rank // shards,
            "shards": shards,
            **fig,
            "formula_1_minus_r(m+2)/(2dm)": 1 - rank * (shards + 2) / (2 * d * shards),
            "bytes_fp32_params": fp32,
            "saved_fraction_with_fp32_params": 1 - (fig["bytes_powersgd"] + fp32) / (fig["bytes_uncompressed"] + fp32),
        }
    return out


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timing_figures(repeats: int, batch_size: int) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = model_config("prior", "tiny")
    model = DallePrior(cfg)
    text = torch.randint(1, cfg.text_vocab, (batch_size, cfg.caption_len))
    image = torch.randint(0, cfg.image_vocab, (batch_size, cfg.image_len))
    backward = []
    for _ in range(repeats + 1):  # the first pass warms up
        model.zero_grad()
        loss = model.loss(text, image)[0]
        t0 = time.perf_counter()
        loss.backward()
        backward.append(time.perf_counter() - t0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    rank = resolve_rank(CommConfig(), cfg.d_model)
    reducer = PowerSGDReducer(dict(model.named_parameters()), rank=rank)
    reducer.reduce(grads)  # warm-up
    compression = _median_seconds(lambda: reducer.reduce(grads), repeats)
    allreduce = _median_seconds(lambda: plain_allreduce(grads), repeats)
    sent = reducer.reduce(grads).bytes_sent
    bwd = statistics.median(backward[1:])
    return {
        "model": "tiny",
        "batch_size": batch_size,
        "rank": rank,
        "compressed_matrices": len(reducer.plans),
        "threads": torch.get_num_threads(),
        "backward_seconds": bwd,
        "compression_seconds": compression,
        "compression_fraction_of_backward": compression / bwd,
        "plain_allreduce_seconds": allreduce,
        "bytes_sent_fp32": sent["sent"],
        "bytes_uncompressed_fp32": sent["uncompressed"],
    }


def orthogonality_figures() -> dict[str, dict[str, float]]:
    out = {}
    for m, r in ((256, 32), (496, 112)):  # 496 × 112: a 12B shard side d/8 at the rank per GPU
        p = ill_conditioned(m, r, cond=1e6)  # (1, m, r) fp32
        gs = p.clone()
        _orthogonalize_gram_schmidt(gs)
        out[f"{m}x{r}"] = {
            "condition_number": 1e6,
            "householder_max_abs_QtQ_minus_I": orthogonality_error(householder_orthogonalize(p)),
            "torch_gram_schmidt_max_abs_QtQ_minus_I": orthogonality_error(gs),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8, help="GPUs per machine sharding each matrix [P §2.5]")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions (medians are reported)")
    parser.add_argument("--batch-size", type=int, default=8, help="tiny prior batch for the backward timing")
    args = parser.parse_args()
    result = {
        **bytes_figures(args.shards),
        "timing": timing_figures(args.repeats, args.batch_size),
        "orthogonality": orthogonality_figures(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
