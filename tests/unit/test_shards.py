"""Shard specs, reading, rank/worker splitting, the resumable cursor, and the dVAE trainer on shards."""

import io
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch
from _shardmaker import key_of, make_image_shards, one_torch_thread  # noqa: F401  (autouse fixture)

from dalle_dist.config import DataConfig, build_config
from dalle_dist.data.pipeline import ImageProcessor, ShardLoader, collate_images
from dalle_dist.data.shards import ShardError, ShardReader, assign_shards, expand_shards, read_shard

COUNTS = [5, 3, 6, 2, 4, 5, 1]  # uneven shard sizes on purpose


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return make_image_shards(tmp_path_factory.mktemp("shards"), len(COUNTS), COUNTS)


def all_keys() -> set[str]:
    return {key_of(s, i) for s, n in enumerate(COUNTS) for i in range(n)}


def test_expand_shards_patterns_lists_and_directories(shards):
    root = Path(shards[0]).parent
    assert expand_shards(f"{root}/{{000000..000006}}.tar") == shards
    assert expand_shards(str(root)) == shards
    assert expand_shards(f"{root}/{{000000,000002}}.tar, {root}/000001.tar") == [shards[0], shards[2], shards[1]]
    assert expand_shards(f"{shards[0]},{shards[0]}") == [shards[0]]  # never twice
    with pytest.raises(ShardError, match="does not exist"):
        expand_shards(f"{root}/{{000000..000009}}.tar")
    with pytest.raises(ShardError, match="names no shards"):
        expand_shards(" , ")
    with pytest.raises(ShardError, match="only local"):
        expand_shards("s3://bucket/{0..3}.tar")


def test_read_shard_gives_img2dataset_samples(shards):
    skipped = Counter()
    samples = list(read_shard(shards[0], skipped))
    assert [s["__key__"] for s in samples] == [key_of(0, i) for i in range(5)]
    assert {"png", "txt", "json"} <= set(samples[0]) and not skipped


@pytest.mark.parametrize("dp_size,workers", [(1, 1), (2, 1), (3, 2), (2, 3), (7, 1)])
def test_rank_worker_split_is_a_partition_every_epoch(dp_size, workers):
    n = 7
    for epoch in range(3):
        lists = [
            assign_shards(n, epoch, seed=5, dp_rank=r, dp_size=dp_size, worker_id=w, num_workers=workers)
            for r in range(dp_size)
            for w in range(workers)
        ]
        flat = [i for lst in lists for i in lst]
        assert sorted(flat) == list(range(n)), lists  # no overlap, no loss
        assert all(lst for lst in lists) and max(map(len, lists)) - min(map(len, lists)) <= 1
    assert assign_shards(n, 0, 5) != assign_shards(n, 1, 5)  # a fresh order each epoch
    assert assign_shards(n, 1, 5) == assign_shards(n, 1, 5)  # deterministic


@pytest.mark.parametrize("dp_size,workers", [(2, 1), (2, 2), (3, 2)])
def test_readers_cover_every_sample_exactly_once(shards, dp_size, workers):
    seen = []
    for r in range(dp_size):
        for w in range(workers):
            reader = ShardReader(
                shards, seed=3, dp_rank=r, dp_size=dp_size, worker_id=w, num_workers=workers, shuffle=4, loop=False
            )
            seen += [s["__key__"] for s in reader]
    assert len(seen) == len(set(seen)) and set(seen) == all_keys()


def test_too_few_shards_for_the_readers_is_refused(shards):
    with pytest.raises(ShardError, match="7 shards cannot feed 4 data-parallel ranks × 2 loader workers"):
        ShardReader(shards, dp_size=4, num_workers=2)


def test_within_shard_shuffle_is_seeded(shards):
    def order(seed):
        return [s["__key__"] for s in ShardReader(shards, seed=seed, shuffle=3, loop=False)]

    a, b, c = order(0), order(0), order(1)
    assert a == b and a != c and sorted(a) == sorted(all_keys())
    plain = [s["__key__"] for s in ShardReader(shards, seed=0, shuffle=0, loop=False)]
    assert plain != a and sorted(plain) == sorted(a)


@pytest.mark.parametrize("stop", [0, 4, 11, 26, 40])
def test_reader_resume_continues_exactly(shards, stop):
    full = [s["__key__"] for s in islice(ShardReader(shards, seed=9, shuffle=3), 60)]  # 60 > 26: crosses epochs
    first = ShardReader(shards, seed=9, shuffle=3)
    head = [s["__key__"] for s in islice(first, stop)]
    again = ShardReader(shards, seed=9, shuffle=3)
    again.load_state_dict(first.state_dict())
    rest = [s["__key__"] for s in islice(again, 60 - stop)]
    assert head + rest == full
    assert Counter(full[:26]) == Counter(all_keys())  # one epoch = every sample once


def _loader(shards, workers, batch=3, **kw):
    data = DataConfig(min_caption_words=1)
    return ShardLoader(
        shards, ImageProcessor("dvae", 24, data), collate_images, batch, seed=4, shuffle=3, num_workers=workers, **kw
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resume_reproduces_the_batch_stream(shards, workers):
    n, k = 12, 5  # 36 samples: crosses the 26-sample epoch
    full_loader = _loader(shards, workers)
    full = [full_loader.next_batch() for _ in range(n)]
    first = _loader(shards, workers)
    head = [first.next_batch() for _ in range(k)]
    state = first.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    resumed = _loader(shards, workers)
    resumed.load_state_dict(torch.load(buf, weights_only=True))  # checkpoint-safe
    rest = [resumed.next_batch() for _ in range(n - k)]
    assert [b["keys"] for b in head + rest] == [b["keys"] for b in full]
    for a, b in zip(head + rest, full):
        torch.testing.assert_close(a["images"], b["images"], rtol=0, atol=0)  # same crops and flips
    assert full[0]["images"].shape == (3, 3, 24, 24) and full[0]["images"].dtype == torch.uint8
    assert resumed.state_dict() == full_loader.state_dict()


def test_loader_splits_ranks_without_overlap_or_loss(shards):
    per_rank = []
    for r in range(2):
        loader = _loader(shards, 0, batch=1, dp_rank=r, dp_size=2)
        n_epoch0 = sum(COUNTS[i] for i in assign_shards(len(shards), 0, seed=4, dp_rank=r, dp_size=2))
        per_rank.append([loader.next_batch()["keys"][0] for _ in range(n_epoch0)])
        assert loader.state_dict()["cursors"][0]["shard_index"] == len(assign_shards(len(shards), 0, 4, r, 2)) - 1
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(all_keys())


def test_loader_refuses_a_cursor_from_another_worker_count(shards):
    state = _loader(shards, 2).state_dict()
    with pytest.raises(ValueError, match="--data.num_workers"):
        _loader(shards, 0).load_state_dict(state)


def test_unusable_data_fails_loudly_instead_of_hanging(tmp_path, shards):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(RuntimeError, match="without one sample"):
        _loader([str(bad)], 0).next_batch()
    strict = DataConfig(min_caption_words=50)  # every caption is too short
    loader = ShardLoader(shards[:1], ImageProcessor("dvae", 24, strict), collate_images, 2, num_workers=0)
    with pytest.raises(RuntimeError, match="caption_too_short"):
        loader.next_batch()


# --------------------------------------------------------------------------------------------------
# The dVAE trainer on shards: resume is exact
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory) -> list[str]:
    return make_image_shards(tmp_path_factory.mktemp("big"), 4, [3, 2, 3, 2], h=36, w=44)


@pytest.mark.parametrize("workers", [0, 2])
def test_dvae_trainer_resume_on_shards_reproduces_uninterrupted_run(tmp_path, big_shards, workers):
    from dalle_dist.files import load_checkpoint
    from dalle_dist.train.stages import DVAETrainer

    def cfg(out, steps):
        over = {
            "train.out_dir": str(out),
            "train.progress": "false",
            "train.log_every": "1",
            "train.steps": str(steps),
            "data.source": "shards",
            "data.shards": ",".join(big_shards),
            "data.batch_size": "3",
            "data.shuffle_buffer": "3",
            "model.image_size": "32",
            "data.num_workers": str(workers),
        }
        return build_config("dvae", ["configs/dvae/tiny.yaml"], over)

    full = [h["loss"] for h in DVAETrainer(cfg(tmp_path / "full", 4)).fit()]  # 12 samples > 10: two epochs
    first = [h["loss"] for h in DVAETrainer(cfg(tmp_path / "part", 2)).fit()]
    rest = [h["loss"] for h in DVAETrainer(cfg(tmp_path / "part", 4)).fit()]
    assert first + rest == full  # bit-exact: same samples, same crops, same model
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["data"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["data"]
    assert a == b and a["world"] == 1 and a["cursors"][0]["num_readers"] == max(1, workers)


def test_stage_source_mismatch_is_explained(tmp_path, big_shards):
    from dalle_dist.config import ConfigError
    from dalle_dist.train.stages import DVAETrainer

    with pytest.raises(ConfigError, match="--data.shards"):
        build_config("dvae", overrides={"data.source": "shards"})
    cfg = build_config("dvae", overrides={"data.source": "tokens", "data.shards": big_shards[0]})
    cfg.train.out_dir = str(tmp_path)
    with pytest.raises(ConfigError, match="data.source shards"):
        DVAETrainer(cfg)  # refused before any process group starts
