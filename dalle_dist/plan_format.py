"""``plan --dry-run``'s human-readable output: one table row per pp rank, the verdict, the bubble, the traffic."""

from __future__ import annotations

from typing import Any

from .plan_build import GIB

TABLE_KEYS = (
    "params",
    "grads",
    "optimizer",
    "ema",
    "error_buffers",
    "activations",
    "comm_buffers",
    "reduce_workspace",
    "optimizer_workspace",
    "total",
)


def _gib(n: float | None, unit: int = GIB) -> str:
    return "-" if n is None else f"{n / unit:.2f}"


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_dry_run(r: dict[str, Any]) -> str:
    """One table row per pp rank (GiB), then the verdict, the bubble and the replica traffic."""
    t, b, g, s = r["topology"], r["batch"], r["gpu"], r["settings"]
    checkpointing = "on" if s["activation_checkpointing"] else "off"
    short = {
        "error_buffers": "error_buf",
        "activations": "activation",
        "comm_buffers": "fsdp_buf",
        "reduce_workspace": "reduce_ws",
        "optimizer_workspace": "optim_ws",
    }
    header = "".join(f"{short.get(k, k):>12}" for k in TABLE_KEYS) + f"{'paper fmt':>12}"
    unit, unit_name = (GIB, "GiB") if r["per_rank_memory_bytes"]["total"] >= GIB else (2**20, "MiB")  # tiny models
    lines = [
        f"prior {r['flavor']} on pp={t['pp']} × replicate={t['replicate']} × shard={t['shard']} = {t['world_size']} "
        f"ranks, {g['name']} (usable {_gib(g['usable_bytes'])} GiB = nominal − {g['reserve']})",
        f"  batch {b['global']}: {b['per_rank']} per rank = {b['microbatches']} microbatch(es) × {b['micro_batch']} "
        f"(schedule {b['schedule']}, virtual stages {b['virtual_stages']}); {s['precision']} ({s['storage']} "
        f"storage), attention {s['attention']}, activation checkpointing {checkpointing}",
        "",
        f"  {unit_name + ' per rank':<14}{header}",
    ]
    for rank in r["ranks"]:
        cells = [_gib(rank["memory"][k], unit) for k in TABLE_KEYS] + [_gib(rank["paper_formats"]["total"], unit)]
        lines.append(f"  {'pp rank ' + str(rank['pp_rank']):<14}" + "".join(f"{c:>12}" for c in cells))
    m = r["per_rank_memory_bytes"]
    lines += [
        "",
        f"  worst rank: pp rank {m['pp_rank']}, {_gib(m['total'], unit)} {unit_name} at the {m['peak_phase']} peak → "
        f"{'FITS' if r['fits'] else 'DOES NOT FIT'} (headroom {_gib(r['headroom_bytes'])} GiB); in the paper's "
        f"formats {_gib(r['paper_formats']['total'], unit)} {unit_name} → "
        f"{'fits' if r['paper_formats']['fits'] else 'does not fit'}",
        f"  optimizer: {_gib(m['optimizer'], unit)} {unit_name} with {r['settings']['moments']} moments for the "
        "16-bit weights, "
        f"{_gib(m['optimizer_paper_formats'], unit)} {unit_name} in the paper's 16-bit moment formats",
        f"  pipeline bubble: {r['bubble_fraction']:.4f}",
    ]
    bps = r["bytes_per_step"]
    traffic = f"  replica reduction per rank and step: uncompressed {bps['uncompressed'] / 1e6:.1f} MB"
    if bps["powersgd"] is not None:
        traffic += (
            f", PowerSGD (rank {bps['powersgd_rank_per_gpu']} per GPU) {bps['powersgd'] / 1e6:.1f} MB; compression "
            f"rate {_rate(r['compression_rate'])} on the compressed matrices ({_rate(r['compression_rate_all'])} "
            f"overall, {_rate(r['compression_rate_paper_layout'])} in the paper's shard layout)"
        )
    lines.append(traffic)
    lines += [f"  note: {n}" for n in r["notes"]]
    lines.append(f"  ({r['seconds']:.1f} s)")
    return "\n".join(lines)
