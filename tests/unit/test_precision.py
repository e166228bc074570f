"""Precision policy [P §2.4, D.2]: fp32 parameter classes, 16-bit weights, fp32 Adam state, activation checkpointing,
16-bit training and exact resume through the Trainer."""

import functools
import math

import numpy as np
import pytest
import torch

from dalle_dist.config import ConfigError, DVAEModelConfig, PrecisionConfig, PriorModelConfig, build_config
from dalle_dist.files import load_checkpoint
from dalle_dist.models.dvae import Conv2d, DiscreteVAE
from dalle_dist.models.prior import DallePrior
from dalle_dist.precision import (
    AdamW32,
    ResblockGradScaler,
    apply_activation_checkpointing,
    apply_precision,
    apply_stage_precision,
    grads_by_block,
    keeps_fp32,
)
from dalle_dist.train.export import read_prior_weights
from dalle_dist.train.stages import DVAETrainer, PriorTrainer

MICRO = dict(n_layers=2, d_model=32, n_heads=2, text_len=8, text_vocab=64, grid=4, image_vocab=64, conv_kernel=3)
LOW = {"fp16": torch.float16, "bf16": torch.bfloat16}


def micro_model(seed: int = 0) -> DallePrior:
    torch.manual_seed(seed)
    return DallePrior(PriorModelConfig(**MICRO))


def batch(b: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cfg = PriorModelConfig(**MICRO)
    text = torch.randint(1, cfg.text_vocab, (b, cfg.caption_len), generator=g)
    return text, torch.randint(0, cfg.image_vocab, (b, cfg.image_len), generator=g)


def micro_trainer(tmp_path, dtype: str, **over) -> PriorTrainer:
    o = {f"model.{k}": str(v) for k, v in MICRO.items()}
    o.update({"train.out_dir": str(tmp_path), "train.progress": "false", "train.log_every": "1"})
    o.update({"data.batch_size": "2", "optim.warmup_steps": "2", "precision.dtype": dtype, **over})
    return PriorTrainer(build_config("prior", ["configs/prior/tiny.yaml"], o))


# ---- which tensors are 16-bit [P D.2] ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_fp32_classes_stay_fp32_and_weight_matrices_go_16_bit(dtype):
    model = micro_model()
    policy = apply_precision(model, PrecisionConfig(dtype=dtype))
    low = {n for n, p in model.named_parameters() if p.dtype == LOW[dtype]}
    fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert low | fp32 == {n for n, _ in model.named_parameters()}
    assert low == set(policy.low_params) and fp32 == set(policy.fp32_params)
    assert low == {n for n, p in model.named_parameters() if n.startswith("resblocks.") and p.ndim == 2}
    assert "resblocks.0.attn.q_proj.weight" in low and "resblocks.3.fc2.weight" in low
    for name in ("resblocks.0.ln.weight", "resblocks.1.fc1.bias", "embed.text_tok.weight", "embed.row"):
        assert name in fp32  # gains, biases, embeddings
    assert all(n in fp32 for n, _ in model.named_parameters() if n.startswith("head."))  # unembeddings, ln_f
    assert policy.scaling == ("per_resblock" if dtype == "fp16" else "none")  # bf16 needs no scaling

    text_logits, image_logits = model(*batch())
    assert text_logits.dtype == image_logits.dtype == torch.float32  # logits in fp32 [P D.2]
    seen = {}
    model.resblocks["1"].fc1.register_forward_hook(lambda m, a, out: seen.update(dtype=out.dtype))
    model.loss(*batch())[0].backward()
    assert seen["dtype"] == LOW[dtype]  # the branch computes in 16 bits
    assert model.embed.text_tok.weight.grad.dtype == torch.float32 and model.resblocks["1"].fc1.bias.grad.dtype == (
        torch.float32
    )


def test_fp32_policy_changes_nothing():
    model, ref = micro_model(), micro_model()
    policy = apply_precision(model, PrecisionConfig(dtype="fp32"))
    assert policy.scaling == "none" and not policy.low_params
    assert "forward" not in model.resblocks["0"].__dict__
    torch.testing.assert_close(model(*batch()), ref(*batch()), rtol=0, atol=0)


def test_keeps_fp32_rule():
    assert keeps_fp32("embed.text_tok.weight", torch.zeros(4, 4))
    assert keeps_fp32("head.image_unembed.weight", torch.zeros(4, 4))
    assert keeps_fp32("resblocks.3.ln.weight", torch.zeros(4)) and keeps_fp32("resblocks.3.fc1.bias", torch.zeros(4))
    assert not keeps_fp32("resblocks.3.fc1.weight", torch.zeros(4, 4))


def test_dvae_policy_sets_compute_dtype_and_keeps_params_fp32():
    dvae = DiscreteVAE(DVAEModelConfig(image_size=16, n_hid=8, n_init=8, vocab_size=16))
    policy = apply_precision(dvae, PrecisionConfig(dtype="fp16"))
    assert policy.scaling == "global"  # one global loss scale for the dVAE [P A.2]
    assert all(p.dtype == torch.float32 for p in dvae.parameters())
    convs = [m for m in dvae.modules() if isinstance(m, Conv2d)]
    assert {m.compute_dtype for m in convs} == {torch.float16}
    assert any(m.keep_fp32 for m in convs)  # codebook-sized convs still run in fp32 [C]


def test_bad_precision_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="precision.dtype"):
        PrecisionConfig(dtype="fp8").validate()
    with pytest.raises(ConfigError, match="min_scale_log2"):
        PrecisionConfig(init_scale_log2=30).validate()
    with pytest.raises(ConfigError, match="precision.dtype"):
        micro_trainer(tmp_path, "half")


# ---- optimizer state in fp32 -------------------------------------------------------------------------


def test_adamw32_equals_torch_adamw_on_fp32_params():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    kw = dict(lr=1e-2, betas=(0.9, 0.96), eps=1e-8, weight_decay=4.5e-2)
    ours, ref = AdamW32(a, **kw), torch.optim.AdamW(b, foreach=False, **kw)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[p][k], ref.state[q][k], rtol=0, atol=0)


@pytest.mark.parametrize("master", [False, True])
def test_adamw32_keeps_fp32_moments_for_fp16_params_through_load(master):
    p = torch.nn.Parameter(torch.full((4,), 0.5, dtype=torch.float16))
    opt = AdamW32([p], lr=1e-4, master_weights=master)
    p.grad = torch.full((4,), 2.0**-20, dtype=torch.float16)  # a small gradient, below fp16's normal range
    opt.step()
    st = opt.state[p]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
    assert float(st["exp_avg"][0]) == pytest.approx(0.1 * 2.0**-20)
    assert float(st["exp_avg_sq"][0]) == pytest.approx(1e-3 * 2.0**-40)  # 0 in fp16: below its subnormals
    assert ("master" in st) == master and p.dtype == torch.float16
    if master:
        assert st["master"].dtype == torch.float32 and torch.equal(st["master"].half(), p.detach())

    fresh = AdamW32([torch.nn.Parameter(p.detach().clone())], lr=1e-4, master_weights=master)
    fresh.load_state_dict(opt.state_dict())  # torch.optim would cast the moments to fp16 here
    q = fresh.param_groups[0]["params"][0]
    for k, v in st.items():
        assert fresh.state[q][k].dtype == v.dtype and torch.equal(fresh.state[q][k], v), k


# ---- activation checkpointing [P §2.4] --------------------------------------------------------------


def count_call(calls: list[int], module: torch.nn.Module, args: tuple) -> None:
    calls.append(1)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_activation_checkpointing_gives_identical_gradients(dtype):
    grads = []
    for ckpt in (False, True):
        model = micro_model()
        cfg = PrecisionConfig(dtype=dtype)
        apply_stage_precision(model, cfg)  # the engine's storage: fp32 tensors, 16-bit values and compute
        if ckpt:
            apply_activation_checkpointing(model)
        scaler = ResblockGradScaler(list(model.resblocks), cfg)
        scaler.attach(model)
        calls: list[int] = []
        model.resblocks["0"].register_forward_pre_hook(functools.partial(count_call, calls))
        model.loss(*batch())[0].backward()
        assert len(calls) == 1  # the recomputation runs inside the block: its hooks (the scaler's) fire once
        assert all(scaler.unscale_(grads_by_block(model.named_parameters()))[0].values())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=0, msg=name)


# ---- through the Trainer -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_tiny_prior_trains_in_16_bit(tmp_path, dtype):
    t = micro_trainer(tmp_path, dtype).build()
    fixed = t.data.batch(0)
    t.data.batch = lambda step: fixed
    hist = [t.step() for _ in range(30)]
    losses = [h["loss"] for h in hist]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert sum(h["skipped"] for h in hist) == 0
    assert (t.grad_scaler is not None) == (dtype == "fp16")
    if dtype == "fp16":
        assert hist[-1]["gradscale/0/log2"] == pytest.approx(13.03)


def test_fp16_checkpoint_resume_reproduces_uninterrupted_run(tmp_path):
    full_t = micro_trainer(tmp_path / "full", "fp16", **{"train.steps": "6"})
    full = [h["loss"] for h in full_t.fit()]
    part = micro_trainer(tmp_path / "part", "fp16", **{"train.steps": "3"})
    first = [h["loss"] for h in part.fit()]
    resumed = micro_trainer(tmp_path / "part", "fp16", **{"train.steps": "6"})
    rest = [h["loss"] for h in resumed.fit()]
    assert first + rest == full  # bit-exact: 16-bit weights, bf16 moments, grad scales, RNG
    step6 = ("checkpoints", "step_00000006", "trainer.pt")
    a = torch.load(tmp_path.joinpath("full", *step6), weights_only=True)
    b = torch.load(tmp_path.joinpath("part", *step6), weights_only=True)
    assert a["precision"]["grad_scaler"] == b["precision"]["grad_scaler"]
    assert a["precision"]["grad_scaler"]["updates"] == 6
    wa, _ = read_prior_weights(tmp_path / "full", use_ema=False)
    wb, _ = read_prior_weights(tmp_path / "part", use_ema=False)
    w = wa["resblocks.1.fc1.weight"]
    assert torch.equal(w, w.half().float())  # a 16-bit weight: fp16 values in fp32 storage
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    low = set(resumed.parts.policy.low_params)  # precision.moments_dtype bf16 (default): 16-bit moments for those
    for n, p in resumed.view.named_parameters():
        want = torch.bfloat16 if n in low else torch.float32
        st = resumed.optimizer.state[p]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == want, n


def test_nonfinite_gradient_is_skipped_without_scaler(tmp_path):
    t = micro_trainer(tmp_path, "fp32").build()
    t.step()
    before = {k: v.clone() for k, v in t.view.state_dict().items()}
    h = t.view.head.image_unembed.register_full_backward_hook(lambda m, gi, go: (gi[0] * math.nan,))
    m = t.step()
    h.remove()
    assert m["skipped"] == 1.0 and not math.isfinite(m["grad_norm"])
    for k, v in t.view.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_dvae_fp16_uses_a_global_loss_scale_and_checkpoints_it(tmp_path):
    over = {"model.image_size": "16", "model.n_hid": "8", "model.n_init": "8", "model.vocab_size": "16"}
    over.update({"train.out_dir": str(tmp_path), "train.progress": "false", "data.batch_size": "1"})
    cfg = build_config("dvae", ["configs/dvae/tiny.yaml"], {**over, "precision.dtype": "fp16", "train.steps": "1"})
    t = DVAETrainer(cfg)
    hist = t.fit()
    assert t.loss_scaler is not None
    assert hist[-1]["loss_scale"] == 65536.0 and hist[-1]["skipped"] == 0.0
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["precision"]["loss_scaler"]["scale"] == 65536.0
    assert all(v.dtype == torch.float32 for v in state["model"].values())


def test_bf16_moments_for_16_bit_weights_train_and_round_trip(tmp_path):
    t = micro_trainer(tmp_path, "fp16", **{"precision.moments_dtype": "bf16"}).build()
    fixed = t.data.batch(0)
    t.data.batch = lambda step: fixed
    hist = [t.step() for _ in range(30)]
    losses = [h["loss"] for h in hist]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    low = set(t.parts.policy.low_params)
    for n, p in t.view.named_parameters():
        want = torch.bfloat16 if n in low else torch.float32  # fp32 classes keep fp32 moments
        assert t.optimizer.state[p]["exp_avg"].dtype == want and t.optimizer.state[p]["exp_avg_sq"].dtype == want
    path = t.save()
    again = micro_trainer(tmp_path, "fp16", **{"precision.moments_dtype": "bf16"}).build()
    again.load(path)
    for p, q in zip(t.view.parameters(), again.view.parameters()):
        assert torch.equal(t.optimizer.state[p]["exp_avg_sq"], again.optimizer.state[q]["exp_avg_sq"])
        assert again.optimizer.state[q]["exp_avg_sq"].dtype == t.optimizer.state[p]["exp_avg_sq"].dtype
    with pytest.raises(ConfigError, match="moments_dtype"):
        micro_trainer(tmp_path, "fp16", **{"precision.moments_dtype": "fp8"})
