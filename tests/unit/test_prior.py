"""The prior: shapes, layout, causality, pad embeddings, loss weighting, parameter count, a tiny fit."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from dalle_dist.config import ConfigError, PriorModelConfig, model_config
from dalle_dist.models.attention import layer_kinds
from dalle_dist.models.prior import (
    IGNORE_INDEX,
    AttentionResBlock,
    DallePrior,
    MLPResBlock,
    compute_loss,
    effective_params,
)


def tiny(**overrides: object) -> PriorModelConfig:
    return dataclasses.replace(model_config("prior", "tiny"), **overrides)


def batch(cfg: PriorModelConfig, b: int = 2, seed: int = 0, n_pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random captions (the last n_pad caption slots padded) and random image tokens."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, cfg.text_vocab, (b, cfg.caption_len), generator=g)
    if n_pad:
        text[:, -n_pad:] = cfg.text_pad_id
    image = torch.randint(0, cfg.image_vocab, (b, cfg.image_len), generator=g)
    return text, image


@pytest.fixture(scope="module")
def model() -> DallePrior:
    torch.manual_seed(0)
    return DallePrior(tiny()).eval()


def test_shapes_and_dtypes(model: DallePrior) -> None:
    cfg = model.cfg
    text, image = batch(cfg, b=3)
    text_logits, image_logits = model(text, image)
    assert text_logits.shape == (3, cfg.text_len - 1, cfg.text_vocab)
    assert image_logits.shape == (3, cfg.image_len, cfg.image_vocab)
    assert text_logits.dtype == image_logits.dtype == torch.float32
    assert model.embed(text, image).shape == (3, cfg.seq_len, cfg.d_model)
    assert model.embed(text, image[:, :0]).shape == (3, cfg.text_len, cfg.d_model)


def test_prefix_forward_gives_next_token_logits(model: DallePrior) -> None:
    text, image = batch(model.cfg)
    _, full = model(text, image)
    _, prefix = model(text, image[:, :5])
    assert prefix.shape[1] == 6  # rows 0..5 predict z_0..z_5
    torch.testing.assert_close(prefix, full[:, :6], atol=1e-5, rtol=1e-5)


def test_resblocks_layout(model: DallePrior) -> None:
    cfg = model.cfg
    assert list(model.resblocks.keys()) == [str(i) for i in range(2 * cfg.n_layers)]
    kinds = layer_kinds(cfg.n_layers)
    for i, block in enumerate(model.resblocks.values()):
        if i % 2 == 0:
            assert isinstance(block, AttentionResBlock) and block.attn.kind == kinds[i // 2]
        else:
            assert isinstance(block, MLPResBlock)
    names = set(model.state_dict())
    assert "resblocks.0.attn.q_proj.weight" in names and "resblocks.1.fc2.weight" in names
    assert not any("mask" in n for n in names), "masks must not be in the state dict"


def test_block_returns_branch_only(model: DallePrior) -> None:
    x = torch.randn(2, model.cfg.seq_len, model.cfg.d_model)
    block = model.resblocks["1"]
    expected = block.fc2(F.gelu(block.fc1(block.ln(x))))
    torch.testing.assert_close(block(x), expected)


def test_dense_layout_sees_the_whole_prefix() -> None:
    """attn_layout "dense": every layer is plain causal, so even a one-layer model's last image row depends on
    z_0, which the paper's single conv layer (k=3) cannot see; an unknown layout is refused by the config."""
    torch.manual_seed(0)
    cfgs = {lay: tiny(n_layers=1, conv_kernel=3, attn_layout=lay) for lay in ("paper", "dense")}
    moved = {}
    for lay, cfg in cfgs.items():
        m = DallePrior(cfg).eval()
        assert [b.attn.kind for i, b in enumerate(m.resblocks.values()) if i % 2 == 0] == layer_kinds(1, lay)
        text, image = batch(cfg)
        changed = image.clone()
        changed[:, 0] = (changed[:, 0] + 1) % cfg.image_vocab
        with torch.no_grad():
            moved[lay] = not torch.allclose(m(text, changed)[1][:, -1], m(text, image)[1][:, -1])
    assert moved == {"paper": False, "dense": True}
    with pytest.raises(ConfigError, match="attn_layout"):
        tiny(attn_layout="blocks").validate()


def test_image_causality(model: DallePrior) -> None:
    """Changing z_j changes no image logits at rows ≤ j and no text logits (every mask kind is in the tiny model)."""
    cfg = model.cfg
    text, image = batch(cfg)
    text_ref, image_ref = model(text, image)
    for j in (0, 9, 30, cfg.image_len - 1):
        changed = image.clone()
        changed[:, j] = (changed[:, j] + 1) % cfg.image_vocab
        text_new, image_new = model(text, changed)
        assert torch.equal(text_new, text_ref)
        assert torch.equal(image_new[:, : j + 1], image_ref[:, : j + 1])
        if j + 1 < cfg.image_len:
            assert not torch.allclose(image_new[:, j + 1], image_ref[:, j + 1]), "z_j must inform the next row"


def test_text_causality(model: DallePrior) -> None:
    cfg = model.cfg
    text, image = batch(cfg)
    text_ref, _ = model(text, image)
    k = 7  # caption index, in slot k + use_bos
    changed = text.clone()
    changed[:, k] = (changed[:, k] % (cfg.text_vocab - 1)) + 1
    text_new, _ = model(changed, image)
    slot = k + int(cfg.use_bos)
    assert torch.equal(text_new[:, :slot], text_ref[:, :slot])
    assert not torch.allclose(text_new[:, slot], text_ref[:, slot])


@pytest.mark.parametrize(("use_bos", "use_soi"), [(True, True), (False, True), (True, False), (False, False)])
def test_pad_embedding_only_at_pad_slots(use_bos: bool, use_soi: bool) -> None:
    torch.manual_seed(1)
    cfg = tiny(use_bos=use_bos, use_soi=use_soi)
    emb = DallePrior(cfg).embed
    text, _ = batch(cfg, n_pad=4)
    text[0, 2] = cfg.text_pad_id  # a pad in the middle too
    out = emb.embed_text(text)  # (B, text_len, d)
    off = int(use_bos)
    for b in range(text.shape[0]):
        for i, tok in enumerate(text[b].tolist()):
            slot = off + i
            source = emb.text_pad[slot] if tok == cfg.text_pad_id else emb.text_tok.weight[tok]
            torch.testing.assert_close(out[b, slot], source + emb.text_pos[slot])
    if use_bos:
        torch.testing.assert_close(out[:, 0], (emb.bos + emb.text_pos[0]).expand(2, -1))
    if use_soi:
        torch.testing.assert_close(out[:, -1], (emb.soi + emb.text_pos[-1]).expand(2, -1))
    with torch.no_grad():
        emb.text_tok.weight[cfg.text_pad_id] += 100.0  # the pad id's own token embedding is never read
    torch.testing.assert_close(emb.embed_text(text), out)


def test_targets(model: DallePrior) -> None:
    cfg = model.cfg  # BOS and SOI on
    text, _ = batch(cfg, n_pad=3)
    targets = model.targets(text)
    assert targets.shape == (2, cfg.text_len - 1)
    # slot s predicts slot s+1; slot 0 (BOS) predicts caption token 0.
    assert torch.equal(targets[:, : cfg.caption_len - 3], text[:, :-3])
    assert (targets[:, cfg.caption_len - 3 :] == IGNORE_INDEX).all(), "pads and SOI are not targets"


def test_loss_weighting_matches_independent_cross_entropy(model: DallePrior) -> None:
    cfg = model.cfg
    text, image = batch(cfg, n_pad=5)
    text[1, 4:] = cfg.text_pad_id  # different caption lengths: the mean must run over real tokens only
    loss, metrics = model.loss(text, image)
    text_logits, image_logits = model(text, image)
    # Independent reference: gather the real (slot, next token) pairs by hand.
    logits, targets = [], []
    for b in range(text.shape[0]):
        for i, tok in enumerate(text[b].tolist()):
            if tok != cfg.text_pad_id:
                logits.append(text_logits[b, i + int(cfg.use_bos) - 1])
                targets.append(tok)
    ce_text = F.cross_entropy(torch.stack(logits), torch.tensor(targets))
    ce_image = F.cross_entropy(image_logits.reshape(-1, cfg.image_vocab), image.reshape(-1))
    torch.testing.assert_close(loss, ce_text / 8 + 7 * ce_image / 8)
    torch.testing.assert_close(metrics["loss_text"], ce_text)
    torch.testing.assert_close(metrics["loss_image"], ce_image)
    assert not metrics["loss"].requires_grad


def test_loss_without_text_targets(model: DallePrior) -> None:
    cfg = model.cfg
    text, image = batch(cfg)
    text[:] = cfg.text_pad_id
    loss, metrics = model.loss(text, image)
    assert metrics["loss_text"].item() == 0.0
    torch.testing.assert_close(loss, cfg.image_loss_weight * metrics["loss_image"])


def test_compute_loss_checks_shapes() -> None:
    cfg = tiny()
    with pytest.raises(ValueError, match="do not match"):
        targets = torch.zeros(1, 3, dtype=torch.long)
        compute_loss(torch.zeros(1, 3, 5), torch.zeros(1, 4, 5), targets, targets, cfg)


def test_init_statistics() -> None:
    torch.manual_seed(0)
    cfg = tiny(d_model=128, n_heads=4)
    model = DallePrior(cfg)
    fc1 = model.resblocks["1"].fc1.weight
    fc2 = model.resblocks["1"].fc2.weight
    assert abs(fc1.std().item() - cfg.init_std) < 0.1 * cfg.init_std
    assert abs(fc2.std().item() - cfg.init_std / math.sqrt(2 * cfg.n_layers)) < 0.1 * cfg.init_std
    assert (model.resblocks["0"].attn.q_proj.bias == 0).all()
    assert (model.head.ln_f.weight == 1).all()
    assert abs(model.embed.text_pad.std().item() - cfg.pos_init_std) < 0.1 * cfg.pos_init_std


def test_meta_build_then_materialize() -> None:
    with torch.device("meta"):
        model = DallePrior(tiny())
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    text, image = batch(model.cfg)
    loss, _ = model.loss(text, image)
    assert torch.isfinite(loss) and abs(loss.item() - math.log(model.cfg.image_vocab)) < 0.5


def test_effective_params_12b() -> None:
    cfg = model_config("prior", "12B")
    with torch.device("meta"):
        model = DallePrior(cfg)
    n = effective_params(model)
    assert n == 12 * 64 * 3968**2
    assert abs(n - 12.0e9) / 12.0e9 < 0.01
    assert len(model.resblocks) == 128  # one gradient scale per resblock [P App. D.1]


def test_effective_params_excludes_everything_else(model: DallePrior) -> None:
    cfg = model.cfg
    assert effective_params(model) == 12 * cfg.n_layers * cfg.d_model**2


def test_loss_falls_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    cfg = tiny()
    model = DallePrior(cfg)
    text, image = batch(cfg, b=4, n_pad=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss, _ = model.loss(text, image)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.7 * first, (first, loss.item())
