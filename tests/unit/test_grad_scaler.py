"""Per-resblock gradient scaling [P §2.4, Fig. 4, App. D.1]: backward mechanics, the update rule, skips, state."""

import io
import math

import pytest
import torch

from dalle_dist.config import PrecisionConfig, PriorModelConfig, build_config
from dalle_dist.models.prior import DallePrior
from dalle_dist.precision import REST, ResblockGradScaler, apply_stage_precision, grads_by_block, sync_finite_flags
from dalle_dist.train.stages import PriorTrainer

MICRO = dict(n_layers=2, d_model=32, n_heads=2, text_len=8, text_vocab=64, grid=4, image_vocab=64, conv_kernel=3)
GROWTH = 2.0**1e-3


def micro_model(seed: int = 0) -> DallePrior:
    torch.manual_seed(seed)
    return DallePrior(PriorModelConfig(**MICRO))


def batch(b: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = PriorModelConfig(**MICRO)
    text = torch.randint(1, cfg.text_vocab, (b, cfg.caption_len), generator=g)
    return text, torch.randint(0, cfg.image_vocab, (b, cfg.image_len), generator=g)


def plant_inf(model: DallePrior, key: str) -> torch.utils.hooks.RemovableHandle:
    """Multiply the gradient inside resblock ``key``'s branch (at its last Linear's output) by +inf."""
    last = [m for m in model.resblocks[key].modules() if isinstance(m, torch.nn.Linear)][-1]

    def hook(mod, args, out):
        out.register_hook(lambda g: g * math.inf)

    return last.register_forward_hook(hook)


def unscale(scaler: ResblockGradScaler, model: DallePrior) -> dict[str, bool]:
    """The engine's protocol: the fp32 gradients of each resblock divided by its scale in place; the flags."""
    return scaler.unscale_(grads_by_block(model.named_parameters()))[0]


def grads(model: DallePrior) -> dict[str, torch.Tensor]:
    return {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Relative error of each gradient tensor ≤ 1e-6 in norm (fp32 rounding of a different but exact-in-R order of
    operations); the absolute floor covers k_proj biases, whose exact gradient is 0 (softmax shift invariance)."""
    assert got.keys() == want.keys()
    for name, w in want.items():
        err = float((got[name] - w).norm())
        assert err <= 1e-6 * float(w.norm()) + 1e-9, (name, err, float(w.norm()))


# ---- the update rule [P D.1] ------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 4])
def test_initial_scale_and_clamp_bounds_carry_replicas(m):
    s = ResblockGradScaler(["0", "1"], PrecisionConfig(), replicas=m)
    assert s.scales == {"0": m * 2.0**13, "1": m * 2.0**13}
    assert (s.min_scale, s.max_scale) == (m * 2.0**7, m * 2.0**24)


@pytest.mark.parametrize("m", [1, 4])
def test_scripted_sequence_follows_the_rule(m):
    s = ResblockGradScaler(["0", "1"], PrecisionConfig(), replicas=m)
    init = m * 2.0**13
    script = [True] * 10 + [False, False] + [True] * 122 + [False, False]  # block "0" at updates 1..136
    applied = [s.update({"0": ok, "1": True, REST: True}) for ok in script]
    # divisions at 11 (first) and 136 (= 11 + 125); 12 and 135 fall inside the window: held, still skipped
    assert applied == script
    assert s.last_backoff["0"] == 136 and s.last_backoff["1"] is None
    assert s.scales["0"] == pytest.approx(init * GROWTH ** (10 + 122) / 2.0, rel=1e-12)
    assert s.scales["1"] == pytest.approx(init * GROWTH**136, rel=1e-12)  # grows on skipped updates too
    assert (s.updates, s.skips, s.block_skips) == (136, 4, {"0": 4, "1": 0})


def test_rest_flag_skips_without_touching_scales():
    s = ResblockGradScaler(["0"], PrecisionConfig())
    assert s.update({"0": True, REST: False}) is False
    assert s.scales["0"] == pytest.approx(2.0**13 * GROWTH) and s.skips == 1 and s.block_skips["0"] == 0


@pytest.mark.parametrize("m", [1, 4])
def test_scales_clamp_at_both_ends(m):
    s = ResblockGradScaler(["up", "down"], PrecisionConfig(), replicas=m)
    for _ in range(11_199):
        s.update({"up": True, "down": False})
    # 11 octaves of growth take 11,000 updates; 12 half-octave divisions need 11·125 + 1 updates
    assert s.scales["up"] == m * 2.0**24
    assert s.scales["down"] == m * 2.0**7
    assert s.last_backoff["down"] == 1 + 125 * ((11_199 - 1) // 125)  # divisions at 1, 126, 251, ...


def test_window_zero_divides_every_time():
    s = ResblockGradScaler(["0"], PrecisionConfig(backoff_window=0))
    for _ in range(3):
        s.update({"0": False})
    assert math.log2(s.scales["0"]) == pytest.approx(13 - 1.5)


def test_state_round_trip_and_replica_rescale():
    a = ResblockGradScaler(["0", "1", "2"], PrecisionConfig(), replicas=2)
    for t in range(300):
        a.update({"0": t % 7 != 0, "1": t % 50 != 3, "2": True})
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    b = ResblockGradScaler(["0", "1", "2"], PrecisionConfig(), replicas=2)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    for t in range(300, 400):  # identical futures
        flags = {"0": t % 3 != 0, "1": True, "2": t % 11 != 0}
        assert a.update(flags) == b.update(flags)
    assert b.state_dict() == a.state_dict()

    c = ResblockGradScaler(["0", "1", "2"], PrecisionConfig(), replicas=8)  # resume on 4× the replicas [P D.3]
    c.load_state_dict(a.state_dict())
    assert all(c.scales[k] == pytest.approx(4 * a.scales[k]) for k in a.keys)
    with pytest.raises(ValueError, match="differing"):
        ResblockGradScaler(["0", "1"], PrecisionConfig()).load_state_dict(a.state_dict())


def test_update_and_unscale_refuse_misuse():
    s = ResblockGradScaler(list(micro_model().resblocks), PrecisionConfig())
    with pytest.raises(KeyError, match="missing"):
        s.update({"0": True})
    model = micro_model()
    model.loss(*batch())[0].backward()  # gradients, but the scaler was never attached
    with pytest.raises(RuntimeError, match="attach"):
        unscale(s, model)
    with pytest.raises(KeyError, match="not in the model"):
        ResblockGradScaler(["9"], PrecisionConfig()).attach(model)


# ---- backward mechanics [P Fig. 4] ------------------------------------------------------------------


def test_scaled_grads_match_fp32_reference():
    text, image = batch()
    ref = micro_model()
    ref.loss(text, image)[0].backward()

    model = micro_model()
    s = ResblockGradScaler(list(model.resblocks), PrecisionConfig())
    s.attach(model)
    for i, k in enumerate(s.keys):  # arbitrary, non-power-of-two scales
        s.scales[k] = 2.0 ** (7.3 + 4.1 * i)
    model.loss(text, image)[0].backward()
    assert model.resblocks["3"].fc2.weight.grad.abs().max() > 1e3  # really scaled (s_3 ≈ 2^19.6)
    flags = unscale(s, model)
    assert all(flags.values()) and set(flags) == {*s.keys, REST}
    assert_grads_match(grads(model), grads(ref))


def test_backward_uses_the_scale_its_forward_recorded():
    text, image = batch()
    ref = micro_model()
    ref.loss(text, image)[0].backward()
    model = micro_model()
    s = ResblockGradScaler(list(model.resblocks), PrecisionConfig())
    s.attach(model)
    loss = model.loss(text, image)[0]
    s.update(dict.fromkeys(s.keys, False))  # scales change between forward and backward
    loss.backward()
    assert all(unscale(s, model).values())
    assert_grads_match(grads(model), grads(ref))


def test_filter_zeroes_nonfinite_activation_grads_at_the_boundary():
    model = micro_model()
    s = ResblockGradScaler(list(model.resblocks), PrecisionConfig())
    s.attach(model)
    plant_inf(model, "2")
    model.loss(*batch())[0].backward()
    flags, filtered = s.unscale_(grads_by_block(model.named_parameters()))
    assert flags == {"0": True, "1": True, "2": False, "3": True, REST: True}
    assert filtered["2"] > 0
    assert all(filtered[k] == 0 for k in ("0", "1", "3"))
    for name, p in model.named_parameters():  # earlier resblocks and the embeddings got finite gradients
        if not name.startswith("resblocks.2."):
            assert torch.isfinite(p.grad).all(), name
    assert s.update(flags) is False
    assert math.log2(s.scales["2"]) == pytest.approx(13 - 0.5)
    assert all(math.log2(s.scales[k]) == pytest.approx(13.001) for k in ("0", "1", "3"))


def test_overflow_from_a_huge_scale_is_caught_in_fp16():
    model = micro_model()
    cfg = PrecisionConfig(dtype="fp16")
    apply_stage_precision(model, cfg)  # 16-bit values in fp32 storage, fp16 autocast in the branches
    s = ResblockGradScaler(list(model.resblocks), cfg)
    s.attach(model)
    s.scales["1"] = 2.0**40  # the scaled gradient overflows fp16 inside resblock 1's branch
    model.loss(*batch())[0].backward()
    flags = unscale(s, model)
    assert flags["1"] is False and all(v for k, v in flags.items() if k != "1")


def test_hooks_are_inert_without_grad_and_telemetry_keys():
    model = micro_model()
    s = ResblockGradScaler(list(model.resblocks), PrecisionConfig())
    handles = s.attach(model)
    with torch.no_grad():
        model.loss(*batch())
    assert s._used == {}
    for h in handles:
        h.remove()
    keys = set(s.telemetry())
    assert {"gradscale/0/log2", "gradscale/3/skips", "gradscale/1/filtered", "gradscale/2/grad_norm"} <= keys
    assert {"gradscale/skips", "gradscale/updates", "gradscale/rest/grad_norm"} <= keys


def test_sync_finite_flags_without_process_group_is_identity():
    flags = {"0": True, "1": False, REST: True}
    assert sync_finite_flags(flags) == flags


# ---- in the trainer -----------------------------------------------------------------------------------


def micro_trainer(tmp_path, **over) -> PriorTrainer:
    o = {f"model.{k}": str(v) for k, v in MICRO.items()}
    o.update({"train.out_dir": str(tmp_path), "train.progress": "false", "data.batch_size": "2"})
    o.update({"optim.warmup_steps": "2", "precision.dtype": "fp16", **over})
    return PriorTrainer(build_config("prior", ["configs/prior/tiny.yaml"], o)).build()


def test_planted_inf_skips_step_and_backs_off_only_that_scale(tmp_path):
    t = micro_trainer(tmp_path)
    for _ in range(3):
        assert t.step()["skipped"] == 0.0
    before = {k: v.clone() for k, v in t.view.state_dict().items()}
    opt_before = {id(p): {k: v.clone() for k, v in st.items()} for p, st in t.optimizer.state.items()}
    ema_before = {k: v.clone() for k, v in t.ema.shadow.items()}
    log2 = {k: math.log2(v) for k, v in t.grad_scaler.scales.items()}

    handle = plant_inf(t.view, "1")
    m = t.step()
    handle.remove()
    assert m["skipped"] == 1.0 and m["gradscale/skips"] == 1.0 and m["gradscale/1/skips"] == 1.0
    assert m["gradscale/1/log2"] == pytest.approx(log2["1"] - 0.5)
    assert all(m[f"gradscale/{k}/log2"] == pytest.approx(log2[k] + 1e-3) for k in ("0", "2", "3"))
    for k, v in t.view.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    for p, st in t.optimizer.state.items():
        for k, v in st.items():
            torch.testing.assert_close(v, opt_before[id(p)][k], rtol=0, atol=0)
    for k, v in t.ema.shadow.items():
        torch.testing.assert_close(v, ema_before[k], rtol=0, atol=0)

    m = t.step()  # the hook is gone: the next update applies
    assert m["skipped"] == 0.0 and t.step_num == 5
    assert not torch.equal(t.view.resblocks["1"].fc2.weight, before["resblocks.1.fc2.weight"])
