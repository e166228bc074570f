"""Unit tests for the discrete VAE (dalle_dist.models.dvae): architecture parity with [C], objective per [P A.2-A.3]."""

from __future__ import annotations

import math

import pytest
import torch

from dalle_dist.config import ConfigError, DVAEModelConfig, build_config, model_config
from dalle_dist.models.dvae import (
    Conv2d,
    Decoder,
    DecoderBlock,
    DiscreteVAE,
    DVAEObjective,
    Encoder,
    EncoderBlock,
    gaussian_log_prob,
    gumbel_softmax_relaxation,
    kl_to_uniform,
    logit_laplace_log_prob,
    map_pixels,
    unmap_pixels,
)


def _tiny() -> DVAEModelConfig:
    return model_config("dvae", "tiny")


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------
# Architecture parity with openai/DALL-E
# --------------------------------------------------------------------------------------------------


def test_openai_parameter_counts_exact() -> None:
    with torch.device("meta"):
        model = DiscreteVAE(model_config("dvae", "openai"))
    assert _n_params(model.encoder) == 53_786_240
    assert _n_params(model.decoder) == 43_829_766


def test_openai_state_dict_names() -> None:
    with torch.device("meta"):
        model = DiscreteVAE(model_config("dvae", "openai"))
    enc, dec = model.encoder.state_dict(), model.decoder.state_dict()
    for key in (
        "blocks.input.w",
        "blocks.group_1.block_1.res_path.conv_1.w",
        "blocks.group_1.block_2.res_path.conv_4.b",
        "blocks.group_2.block_1.id_path.w",  # 256 → 512 needs a 1×1 skip
        "blocks.output.conv.w",
    ):
        assert key in enc, key
    assert "blocks.group_1.block_1.id_path.w" not in enc  # 256 → 256: identity skip
    assert tuple(enc["blocks.input.w"].shape) == (256, 3, 7, 7)
    assert tuple(enc["blocks.output.conv.w"].shape) == (8192, 2048, 1, 1)
    assert tuple(dec["blocks.input.w"].shape) == (128, 8192, 1, 1)
    assert tuple(dec["blocks.group_1.block_1.id_path.w"].shape) == (2048, 128, 1, 1)
    assert tuple(dec["blocks.output.conv.w"].shape) == (6, 256, 1, 1)
    assert isinstance(model.encoder.blocks.group_1.pool, torch.nn.MaxPool2d)
    assert not hasattr(model.encoder.blocks.group_4, "pool")
    assert isinstance(model.decoder.blocks.group_3.upsample, torch.nn.Upsample)
    assert not hasattr(model.decoder.blocks.group_4, "upsample")
    names = [n for n, _ in model.encoder.blocks.group_1.block_1.res_path.named_children()]
    assert names == ["relu_1", "conv_1", "relu_2", "conv_2", "relu_3", "conv_3", "relu_4", "conv_4"]


def test_resblock_kernels_and_post_gain() -> None:
    enc, dec = EncoderBlock(8, 16, n_layers=8), DecoderBlock(8, 16, n_layers=8)
    assert [enc.res_path[i].kw for i in (1, 3, 5, 7)] == [3, 3, 3, 1]
    assert [dec.res_path[i].kw for i in (1, 3, 5, 7)] == [1, 3, 3, 3]
    assert enc.post_gain == dec.post_gain == 1 / 64
    assert enc.res_path.conv_1.n_out == 4  # hidden width n_out // 4


def test_conv_init_and_odd_kernel() -> None:
    torch.manual_seed(0)
    conv = Conv2d(64, 32, 3)
    assert conv.w.std().item() == pytest.approx(1 / math.sqrt(64 * 9), rel=0.05)
    assert torch.count_nonzero(conv.b) == 0
    with pytest.raises(ValueError, match="odd"):
        Conv2d(4, 4, 2)


def test_meta_build_then_reset_parameters() -> None:
    with torch.device("meta"):
        model = DiscreteVAE(_tiny())
    model.to_empty(device="cpu")
    model.reset_parameters()
    w = model.encoder.blocks.input.w
    assert torch.isfinite(w).all() and w.std().item() == pytest.approx(1 / math.sqrt(3 * 49), rel=0.1)
    assert torch.count_nonzero(model.decoder.blocks.output.conv.b) == 0


# --------------------------------------------------------------------------------------------------
# Shapes, precision, input checks (tiny flavor)
# --------------------------------------------------------------------------------------------------


def test_tiny_shapes() -> None:
    torch.manual_seed(0)
    cfg = _tiny()
    model = DiscreteVAE(cfg)
    x = torch.rand(2, 3, 64, 64)
    logits = model.encoder(map_pixels(x))
    assert logits.shape == (2, cfg.vocab_size, 8, 8) and cfg.grid == 8
    stats = model.decoder(torch.softmax(logits, dim=1))
    assert stats.shape == (2, 6, 64, 64)
    codes = model.encode_codes(x)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.long
    recon = model.reconstruct(x)
    assert recon.shape == x.shape and recon.min() >= 0 and recon.max() <= 1


def test_fp32_convs_stay_fp32_under_bf16() -> None:
    torch.manual_seed(0)
    model = DiscreteVAE(_tiny())
    model.set_compute_dtype(torch.bfloat16)
    seen: dict[str, torch.dtype] = {}

    def record(name: str):
        def hook(_mod, _inp, out):
            seen[name] = out.dtype

        return hook

    model.encoder.blocks.input.register_forward_hook(record("enc_input"))
    model.encoder.blocks.output.conv.register_forward_hook(record("enc_output"))
    model.decoder.blocks.input.register_forward_hook(record("dec_input"))
    model.decoder.blocks.output.conv.register_forward_hook(record("dec_output"))
    x = torch.rand(2, 3, 64, 64)
    logits = model.encoder(map_pixels(x))
    stats = model.decoder(torch.softmax(logits, dim=1))
    assert seen == {
        "enc_input": torch.bfloat16,
        "enc_output": torch.float32,
        "dec_input": torch.float32,
        "dec_output": torch.bfloat16,
    }
    assert logits.dtype == torch.float32 and stats.dtype == torch.float32
    loss, _ = model(x, temperature=1.0, kl_weight=1.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # Parameters themselves are untouched: only the arithmetic is 16-bit.
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bad_inputs_raise() -> None:
    model = DiscreteVAE(_tiny())
    with pytest.raises(ValueError, match="4-D"):
        model.encoder(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="channels"):
        model.encoder(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="floating"):
        model.encoder(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiples"):
        model.encoder(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError, match="channels"):
        model.decoder(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="floating"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), temperature=1.0, kl_weight=1.0)
    with pytest.raises(ValueError, match="integer"):
        model.decode_codes(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="tau"):
        gumbel_softmax_relaxation(torch.zeros(1, 4, 2, 2), tau=0.0)


def test_encoder_decoder_accept_cfg() -> None:
    cfg = DVAEModelConfig(image_size=32, group_count=3, n_hid=8, n_blk_per_group=2, n_init=8, vocab_size=16)
    enc, dec = Encoder(cfg), Decoder(cfg)
    assert enc(torch.rand(1, 3, 32, 32)).shape == (1, 16, 8, 8)
    assert dec(torch.rand(1, 16, 8, 8)).shape == (1, 6, 32, 32)


# --------------------------------------------------------------------------------------------------
# Pixel map, likelihood, KL, relaxation
# --------------------------------------------------------------------------------------------------


def test_map_unmap_round_trip() -> None:
    x = torch.rand(2, 3, 8, 8)
    y = map_pixels(x)
    assert y.min() >= 0.1 - 1e-7 and y.max() <= 0.9 + 1e-7
    torch.testing.assert_close(unmap_pixels(y), x)
    assert unmap_pixels(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]  # clamped


@pytest.mark.parametrize("mu, b", [(0.0, 1.0), (2.0, 0.5), (-3.0, 0.2), (1.0, 2.0), (0.5, 0.05)])
def test_logit_laplace_integrates_to_one(mu: float, b: float) -> None:
    # Integrate over x ∈ (0, 1) by substituting x = sigmoid(t), dx = x(1−x) dt, on a fine float64 grid.
    t = torch.linspace(-34.0, 34.0, 400_001, dtype=torch.float64)
    x = torch.sigmoid(t)
    dens = logit_laplace_log_prob(x, torch.tensor(mu, dtype=torch.float64), torch.tensor(math.log(b))).exp()
    total = torch.trapezoid(dens * x * (1 - x), t).item()
    assert total == pytest.approx(1.0, abs=1e-3)


def test_logit_laplace_matches_laplace_change_of_variables() -> None:
    x = torch.tensor([0.1, 0.3, 0.5, 0.77, 0.9], dtype=torch.float64)
    mu, log_b = torch.tensor(0.4, dtype=torch.float64), torch.tensor(-0.7, dtype=torch.float64)
    ref = torch.distributions.Laplace(mu, log_b.exp()).log_prob(torch.logit(x)) - torch.log(x * (1 - x))
    torch.testing.assert_close(logit_laplace_log_prob(x, mu, log_b), ref)


def test_kl_to_uniform() -> None:
    K = 64
    uniform = torch.zeros(2, K, 3, 3)
    torch.testing.assert_close(kl_to_uniform(uniform), torch.zeros(2, 3, 3))
    assert (kl_to_uniform(torch.randn(2, K, 3, 3)) > 0).all()
    one_hot_ish = torch.full((1, K, 1, 1), -1e4)
    one_hot_ish[:, 5] = 0.0
    assert kl_to_uniform(one_hot_ish).item() == pytest.approx(math.log(K), abs=1e-4)
    # dim argument: (B, K) layout
    assert kl_to_uniform(torch.zeros(4, K), dim=-1).shape == (4,)


def test_gumbel_relaxation() -> None:
    logits = torch.randn(2, 16, 4, 4, requires_grad=True)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    y1 = gumbel_softmax_relaxation(logits, 1.0, generator=g1)
    y2 = gumbel_softmax_relaxation(logits, 1.0, generator=g2)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(y1.sum(dim=1), torch.ones(2, 4, 4))
    assert (y1 >= 0).all()
    assert y1.max(dim=1).values.min() < 0.999  # soft at τ = 1, not a straight-through one-hot [I#1]
    cold = gumbel_softmax_relaxation(logits, 1e-3, generator=torch.Generator().manual_seed(7))
    assert cold.max(dim=1).values.min() > 0.99
    (y1 * torch.randn_like(y1)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------------


def test_loss_normalization_beta_over_192() -> None:
    torch.manual_seed(0)
    cfg = _tiny()
    model = DiscreteVAE(cfg)
    x = torch.rand(3, 3, 64, 64)
    kl_weight = 6.6
    loss, m = model(x, temperature=1.0, kl_weight=kl_weight, generator=torch.Generator().manual_seed(1))
    dims_per_token = 64 * 64 * 3 / cfg.grid**2
    assert dims_per_token == 192  # same ratio as 256 px / 32 grid in the paper [P A.2]
    expected = m["nll"] + kl_weight * m["kl"] / dims_per_token
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["loss"], loss.detach())
    assert set(m) == {"loss", "nll", "kl", "usage_entropy", "recon_mse", "codebook_usage"}
    assert all(not v.requires_grad and v.ndim == 0 for v in m.values())
    assert 1 <= m["codebook_usage"].item() <= 3 * cfg.grid**2
    # Same generator seed → same loss.
    loss2, _ = model(x, temperature=1.0, kl_weight=kl_weight, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss2, loss)


def _structured_batch() -> torch.Tensor:
    """Four 64-px images: two flat colours, horizontal stripes, a vertical two-tone split."""
    x = torch.zeros(4, 3, 64, 64)
    x[0] = torch.tensor([0.9, 0.2, 0.1]).view(3, 1, 1)
    x[1] = torch.tensor([0.1, 0.5, 0.8]).view(3, 1, 1)
    rows = (torch.arange(64) // 8 % 2).float().view(1, 64, 1)
    x[2] = rows.expand(3, 64, 64) * 0.8 + 0.1
    x[3, :, :, :32] = 0.2
    x[3, :, :, 32:] = torch.tensor([0.7, 0.7, 0.3]).view(3, 1, 1)
    return x


def test_loss_decreases_on_tiny_batch() -> None:
    torch.manual_seed(0)
    model = DiscreteVAE(_tiny())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = _structured_batch()
    gen = torch.Generator().manual_seed(0)
    losses, mses = [], []
    for _ in range(40):
        loss, m = model(x, temperature=1.0, kl_weight=0.1, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        mses.append(m["recon_mse"].item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.3, losses
    assert mses[-1] < mses[0], mses


# --------------------------------------------------------------------------------------------------
# Objective options (off by default): Gaussian likelihood, code-usage entropy bonus
# --------------------------------------------------------------------------------------------------


def test_gaussian_log_prob_is_the_normal_density() -> None:
    x = torch.tensor([0.1, 0.5, 0.9])
    mean = torch.tensor([0.2, 0.5, 0.3])
    for sigma in (0.1, 0.5):
        expected = torch.distributions.Normal(mean, sigma).log_prob(x)
        torch.testing.assert_close(gaussian_log_prob(x, mean, sigma), expected)


def _loss_parts(model: DiscreteVAE, x: torch.Tensor, objective: DVAEObjective) -> tuple[torch.Tensor, dict]:
    return model(x, temperature=0.5, kl_weight=2.0, generator=torch.Generator().manual_seed(3), objective=objective)


def test_gaussian_objective_matches_hand_computation_and_ignores_log_b() -> None:
    torch.manual_seed(0)
    model = DiscreteVAE(_tiny())
    x = _structured_batch()
    loss, m = _loss_parts(model, x, DVAEObjective(likelihood="gaussian", gaussian_sigma=0.2))
    # The same relaxed sample by hand: same generator seed, same draws.
    xm = map_pixels(x)
    logits = model.encoder(xm)
    z = gumbel_softmax_relaxation(logits, 0.5, generator=torch.Generator().manual_seed(3))
    mu = model.decoder(z)[:, :3]
    nll = -gaussian_log_prob(xm, torch.sigmoid(mu), 0.2).sum(dim=(1, 2, 3)) / (3 * 64 * 64)
    kl = kl_to_uniform(logits).sum(dim=(1, 2)) / (3 * 64 * 64)
    torch.testing.assert_close(loss, (nll + 2.0 * kl).mean())
    torch.testing.assert_close(m["nll"], nll.mean().detach())
    loss.backward()
    out_w = model.decoder.blocks.output.conv.w.grad  # (2C, n_hid, 1, 1): rows C.. emit ln b
    assert out_w[:3].abs().sum() > 0
    assert torch.count_nonzero(out_w[3:]) == 0  # the Gaussian has a fixed σ: the ln b channels get no gradient


def test_usage_entropy_bonus_is_subtracted_and_measured() -> None:
    torch.manual_seed(0)
    model = DiscreteVAE(_tiny())
    x = _structured_batch()
    base, m0 = _loss_parts(model, x, DVAEObjective())
    with_bonus, m1 = _loss_parts(model, x, DVAEObjective(usage_entropy_weight=0.5))
    q_mean = torch.softmax(model.encoder(map_pixels(x)), dim=1).mean(dim=(0, 2, 3))  # (vocab,)
    entropy = -(q_mean * q_mean.log()).sum()
    torch.testing.assert_close(m0["usage_entropy"], entropy.detach())
    assert 0 < entropy.item() <= math.log(_tiny().vocab_size) + 1e-5
    torch.testing.assert_close(with_bonus, base - 0.5 * entropy)
    # The bonus pushes the batch-mean code distribution towards uniform: its gradient raises the entropy.
    model.zero_grad()
    (-entropy).backward()
    logits_before = model.encoder(map_pixels(x)).detach()
    with torch.no_grad():
        for p in model.encoder.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
    q_after = torch.softmax(model.encoder(map_pixels(x)), dim=1).mean(dim=(0, 2, 3))
    assert -(q_after * q_after.log()).sum() > entropy.detach()
    assert not torch.equal(logits_before, model.encoder(map_pixels(x)))


def test_objective_validation() -> None:
    assert DVAEObjective() == DVAEObjective("logit_laplace", 0.1, 0.0)  # the paper's objective is the default
    with pytest.raises(ValueError, match="choose one of"):
        DVAEObjective(likelihood="laplace")
    with pytest.raises(ValueError, match="gaussian_sigma"):
        DVAEObjective(gaussian_sigma=0.0)
    with pytest.raises(ValueError, match="usage_entropy_weight"):
        DVAEObjective(usage_entropy_weight=-1.0)
    with pytest.raises(ConfigError, match="did you mean 'gaussian'"):
        build_config("dvae", overrides={"optim.likelihood": "gausian"})
    with pytest.raises(ConfigError, match="usage_entropy_weight"):
        build_config("dvae", overrides={"optim.usage_entropy_weight": -0.1})
    cfg = build_config("dvae", overrides={"optim.likelihood": "gaussian", "optim.usage_entropy_weight": 0.5})
    assert DVAEObjective.from_optim(cfg.optim) == DVAEObjective("gaussian", 0.1, 0.5)
    assert DVAEObjective.from_optim(build_config("dvae").optim) == DVAEObjective()
