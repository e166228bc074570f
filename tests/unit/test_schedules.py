"""Schedules [P A.2, B.2]: endpoints, monotonicity, plateau halving state."""

import math

import pytest

from dalle_dist.config import DVAEOptimConfig
from dalle_dist.train.schedules import DVAESchedules, PlateauHalvingLR, cosine


def test_paper_dvae_schedule_endpoints():
    s = DVAESchedules.from_config(DVAEOptimConfig())
    assert s.kl_weight_at(0) == 0.0
    assert s.kl_weight_at(5000) == pytest.approx(6.6)
    assert s.kl_weight_at(10**6) == pytest.approx(6.6)
    assert s.temperature_at(0) == pytest.approx(1.0)
    assert s.temperature_at(150_000) == pytest.approx(1 / 16)
    assert s.temperature_at(2_000_000) == pytest.approx(1 / 16)
    assert s.lr_at(0) == pytest.approx(1e-4)
    assert s.lr_at(1_200_000) == pytest.approx(1.25e-6)
    assert s.lr_at(3_000_000) == pytest.approx(1.25e-6)
    # Cosine midpoint is the arithmetic mean; β rises and τ falls monotonically.
    assert s.kl_weight_at(2500) == pytest.approx(3.3)
    betas = [s.kl_weight_at(t) for t in range(0, 5001, 250)]
    temps = [s.temperature_at(t) for t in range(0, 150_001, 5000)]
    assert all(a <= b for a, b in zip(betas, betas[1:]))
    assert all(a >= b for a, b in zip(temps, temps[1:]))


def test_schedule_scale_shortens_every_length():
    s = DVAESchedules.from_config(DVAEOptimConfig(schedule_scale=0.001))
    assert (s.kl_warmup_steps, s.temp_steps, s.lr_steps) == (5, 150, 1200)
    assert s.temperature_at(150) == pytest.approx(1 / 16)


def test_cosine_shape():
    assert cosine(0, 2.0, 1.0, 10) == 2.0
    assert cosine(10, 2.0, 1.0, 10) == 1.0
    assert cosine(5, 2.0, 1.0, 10) == pytest.approx(1.5)
    assert cosine(3, 2.0, 1.0, 0) == 1.0


def test_prior_warmup_then_plateau_halving():
    sched = PlateauHalvingLR(lr=4.5e-4, warmup_steps=10, max_halvings=5, patience=5, smoothing=0.0)
    assert sched.lr_at(0) == pytest.approx(4.5e-5)
    assert sched.lr_at(9) == pytest.approx(4.5e-4)
    halved_at = [t for t in range(10, 200) if sched.observe(t, 1.0)]
    # A flat loss after warmup: best set at step 10, then a halving every 5 steps, 5 times.
    assert halved_at == [15, 20, 25, 30, 35]
    assert sched.lr_at(1000) == pytest.approx(4.5e-4 / 32)


def test_improving_loss_never_halves_and_state_round_trips():
    sched = PlateauHalvingLR(lr=1.0, warmup_steps=0, patience=3, smoothing=0.5)
    for t in range(50):
        assert not sched.observe(t, 10.0 * 0.9**t)
    assert not sched.observe(50, math.nan)
    other = PlateauHalvingLR(lr=1.0, warmup_steps=0, patience=3, smoothing=0.5)
    other.load_state_dict(sched.state_dict())
    for t in range(50, 80):
        assert sched.observe(t, 5.0) == other.observe(t, 5.0)
    assert sched.halvings == other.halvings > 0


def test_prior_cosine_decay_after_warmup_and_halvings_multiply():
    sched = PlateauHalvingLR(lr=1e-3, warmup_steps=10, patience=5, smoothing=0.0, decay_steps=110, lr_final=1e-4)
    assert sched.lr_at(0) == pytest.approx(1e-4)  # warmup unchanged: 1/10 of the peak
    assert sched.lr_at(9) == pytest.approx(1e-3)  # the peak where warmup ends
    assert sched.lr_at(60) == pytest.approx(5.5e-4)  # cosine midpoint = mean of the ends
    assert sched.lr_at(110) == pytest.approx(1e-4)
    assert sched.lr_at(10_000) == pytest.approx(1e-4)  # held after
    lrs = [sched.lr_at(t) for t in range(9, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    halved = [t for t in range(10, 16) if sched.observe(t, 1.0)]
    assert halved == [15]
    assert sched.lr_at(60) == pytest.approx(5.5e-4 / 2)
    with pytest.raises(ValueError, match="warmup"):
        PlateauHalvingLR(lr=1.0, warmup_steps=10, decay_steps=10)


def test_prior_optim_config_decay_validation():
    from dalle_dist.config import ConfigError, PriorOptimConfig

    PriorOptimConfig().validate()  # the paper's: no decay
    PriorOptimConfig(warmup_steps=50, lr_steps=800, lr_final=1e-4).validate()
    with pytest.raises(ConfigError, match="greater than optim.warmup_steps"):
        PriorOptimConfig(warmup_steps=50, lr_steps=50).validate()
    with pytest.raises(ConfigError, match="lr_final"):
        PriorOptimConfig(lr=1e-3, warmup_steps=50, lr_steps=800, lr_final=2e-3).validate()
    with pytest.raises(ConfigError, match=">= 0"):
        PriorOptimConfig(lr_steps=-1).validate()
    sched = PlateauHalvingLR.from_config(PriorOptimConfig(lr=1e-3, warmup_steps=50, lr_steps=800, lr_final=1e-4))
    assert sched.lr_at(800) == pytest.approx(1e-4)
