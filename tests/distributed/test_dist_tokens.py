"""Token shards (``data.source=tokens``) in the prior engine, under real torchrun + gloo.

Only the dp ranks split the shards (rank r of R reads permuted shards r, r+R, …), so the global batch of R dp
ranks is the concatenation of R per-rank streams, not the one-rank stream cut into R: a different sample order by
construction. The single-process reference therefore reads exactly those R streams and concatenates them; the
distributed losses must match it, which shows that every rank read its own dp slice (and all pp stages of a
replica the same one). The slices are disjoint. Resume is exact; another dp layout restarts the epoch, with a
warning.
"""

import dataclasses
import json

import pytest
import torch
from _tokens import write_token_shards
from _torchrun import TINY, losses_by_step, torchrun

from dalle_dist.config import build_config
from dalle_dist.data.pipeline import token_loader
from dalle_dist.data.text import ByteTokenizer
from dalle_dist.train.stages import PriorTrainer

STEPS = 6  # 4 shards × 10 samples, 20 per dp rank, 4 per rank and step: the run crosses an epoch boundary
TOPO = ["--parallel.topology", "pp=2,replicate=2"]


def args(shards: str, out, steps: int = STEPS) -> list[str]:
    return [*TINY, "--data.source", "tokens", "--data.shards", shards, "--data.shuffle_buffer", "4",
            "--train.steps", str(steps), "--train.log_every", "1", "--train.save_every", "3",
            "--train.out_dir", str(out)]  # fmt: skip


class ConcatLoader:
    """The dp ranks' streams side by side: what the distributed engine's global batch is made of."""

    def __init__(self, loaders: list) -> None:
        self.loaders = loaders
        self.keys: list[list[list[str]]] = [[] for _ in loaders]  # [dp rank][step] → sample keys

    def next_batch(self) -> dict:
        batches = [loader.next_batch() for loader in self.loaders]
        for seen, b in zip(self.keys, batches):
            seen.append(list(b["keys"]))
        return {"text": torch.cat([b["text"] for b in batches]), "image": torch.cat([b["image"] for b in batches])}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_token_shards(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> tuple[list[float], ConcatLoader]:
    over = {"train.progress": "false", "train.out_dir": str(tmp_path_factory.mktemp("single")),
            "data.source": "tokens", "data.shards": shards, "data.shuffle_buffer": "4"}  # fmt: skip
    trainer = PriorTrainer(build_config("prior", ["configs/prior/tiny.yaml"], over)).build()
    m, per_rank = trainer.cfg.model, dataclasses.replace(trainer.cfg.data, batch_size=trainer.cfg.data.batch_size // 2)
    trainer.data.loader = ConcatLoader([
        token_loader(per_rank, ByteTokenizer(), m.caption_len, m.grid, m.image_vocab, m.text_pad_id, r, 2)
        for r in range(2)
    ])  # fmt: skip
    return [trainer.step()["loss"] for _ in range(STEPS)], trainer.data.loader


@pytest.fixture(scope="module")
def full_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    r = torchrun(4, *args(shards, out), *TOPO)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def test_dp_ranks_read_disjoint_slices_and_match_one_process(full_run, reference):
    ref, loader = reference
    got = losses_by_step(full_run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[1] == pytest.approx(ref[0], rel=1e-5)
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(ref[step - 1], rel=1e-4), step
    # The two dp streams never share a sample within an epoch (20 samples each, 5 steps of 4).
    first_epoch = [{k for step in keys[:5] for k in step} for keys in loader.keys]
    assert len(first_epoch[0]) == len(first_epoch[1]) == 20 and not first_epoch[0] & first_epoch[1]
    # One cursor file per dp rank, written by its pp=0 process, and the cursors differ.
    ckpt = full_run / "checkpoints" / f"step_{STEPS:08d}"
    cursors = [torch.load(ckpt / f"data_dp{r}of2.pt", weights_only=True) for r in range(2)]
    assert [c["dp_rank"] for c in cursors] == [0, 1]
    assert cursors[0]["cursors"][0]["epoch"] == 1  # past the epoch boundary


def test_resume_is_exact(shards, full_run, tmp_path):
    assert torchrun(4, *args(shards, tmp_path, 3), *TOPO).returncode == 0
    r = torchrun(4, *args(shards, tmp_path), *TOPO)
    assert r.returncode == 0, r.stderr[-4000:]
    assert losses_by_step(tmp_path) == losses_by_step(full_run)  # bit-exact: weights, Adam, EMA and data cursors


def test_another_dp_layout_restarts_the_epoch(shards, full_run, tmp_path):
    # The step-3 checkpoint of pp=2 × replicate=2 continued on one process: dp=2 cursors cannot map onto dp=1.
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    step3 = full_run / "checkpoints" / "step_00000003"
    (other / "checkpoints" / step3.name).symlink_to(step3, target_is_directory=True)
    r = torchrun(1, *args(shards, other, 4), "--parallel.topology", "pp=1")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "data cursors are for another data-parallel layout" in r.stdout + r.stderr
    state = torch.load(other / "checkpoints" / "step_00000004" / "data_dp0of1.pt", weights_only=True)
    assert state["dp_size"] == 1 and state["cursors"][0] == {"epoch": 0, "shard_index": 0, "sample_offset": 8}
    row = json.loads((other / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 4 and row["loss"] == pytest.approx(losses_by_step(full_run)[4], rel=0.05)
