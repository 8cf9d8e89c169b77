"""Models: official key table, parameter counts, the three switches, and the blocks against the reference formulas."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from numerics import BLOCK_ROUNDINGS, TINY_MODEL_ROUNDINGS, assert_close_f32

from models import (
    build_model,
    count_parameters,
    expansionnet_v2_config,
    official_checkpoint_filter_fn,
    official_model_config,
    optimizer_expansionnet_config,
)
from models.dynamic_expansion import DynamicExpansionBlock
from models.layers import MultiHeadAttention, StaticExpansionBlock

OFFICIAL = json.loads((Path(__file__).parent / "fixtures" / "expansionnet_v2_state_dict.json").read_text())


def _meta_model(cfg):
    with torch.device("meta"):
        return build_model(cfg)


def test_features_model_keys_shapes_and_order_match_official_table():
    model = _meta_model(expansionnet_v2_config(end_to_end=False))
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    official = [(e["key"], tuple(e["shape"])) for e in OFFICIAL["features"]]
    assert ours == official


def test_end_to_end_captioner_keys_match_and_backbone_keys_exist_in_timm_layout():
    model = _meta_model(expansionnet_v2_config())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = {e["key"]: tuple(e["shape"]) for e in OFFICIAL["end_to_end"]}
    captioner = {k: s for k, s in official.items() if not k.startswith("swin_transf.")}
    assert {k: s for k, s in ours.items() if not k.startswith("swin_transf.")} == captioner
    assert ours["swin_transf.patch_embed.proj.weight"] == official["swin_transf.patch_embed.proj.weight"]


def test_parameter_counts_match_reference_and_seed_model():
    e2e = _meta_model(expansionnet_v2_config())
    assert count_parameters(e2e) == OFFICIAL["parameter_counts"]["end_to_end"] == 233_803_076
    assert count_parameters(e2e, "swin_transf.") == 195_198_516
    assert count_parameters(_meta_model(expansionnet_v2_config(end_to_end=False))) == 38_604_560
    seed = _meta_model(optimizer_expansionnet_config())
    assert 119.0e6 < count_parameters(seed) < 121.0e6
    assert count_parameters(seed, "swin_transf.") == 86_893_816


@pytest.mark.slow
def test_official_end_to_end_state_dict_loads_strictly_after_filter():
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    state = {e["key"]: torch.zeros(e["shape"], dtype=dtypes[e["dtype"]]) for e in OFFICIAL["end_to_end"]}
    for k in state:  # make values distinguishable so a wrong mapping would show
        if state[k].is_floating_point() and state[k].dim() == 1:
            state[k].fill_(hash(k) % 97 / 97.0)
    cfg = official_model_config(state)
    assert (cfg.N_enc, cfg.N_dec, cfg.vocab_size, cfg.max_seq_len, cfg.img_feature_dim) == (3, 3, 10000, 74, 1536)
    assert cfg.backbone is not None and cfg.backbone.name == "swin_large_patch4_window12_384"
    model = build_model(cfg)
    result = model.load_state_dict(official_checkpoint_filter_fn(state, model), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.swin_transf.norm.weight, state["swin_transf.norm.weight"])
    # Microsoft's stage-0 downsample is timm's stage-1 downsample
    assert torch.equal(model.swin_transf.layers[1].downsample.norm.weight,
                       state["swin_transf.layers.0.downsample.norm.weight"])


def test_optimizer_expansionnet_switches_add_exactly_their_parameters():
    full = build_model(tiny_config(end_to_end=False))
    keys = set(full.state_dict())
    assert any(k.endswith("mha.m_k") for k in keys) and any(".mem_attn." in k for k in keys)
    assert any(k.endswith("stc_exp.class_a_gate.weight") for k in keys)
    assert any(k.endswith("dyn_exp.class_b_gate.weight") for k in keys)
    no_memory = set(build_model(tiny_config(end_to_end=False, memory_slots=0)).state_dict())
    assert not any("m_k" in k or "mem_attn" in k or "norm_mem" in k for k in no_memory)
    no_gate = set(build_model(tiny_config(end_to_end=False, mult_residual=False)).state_dict())
    assert not any("gate" in k for k in no_gate)
    assert no_gate | {k for k in keys if "gate" in k} == keys


def test_every_parameter_gets_a_gradient_end_to_end():
    torch.manual_seed(0)
    model = build_model(tiny_config())
    images = torch.randn(2, 3, 32, 32)
    tokens = torch.randint(4, model.vocab_size, (4, 6))
    logits = model(tokens, images=images, caption_index=torch.tensor([0, 0, 1, 1]))
    assert logits.shape == (4, 6, model.vocab_size) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_caption_index_equals_repeating_the_memory():
    torch.manual_seed(0)
    model = build_model(tiny_config(end_to_end=False)).eval()
    feats = torch.randn(2, 5, 24)
    tokens = torch.randint(4, model.vocab_size, (3, 7))
    index = torch.tensor([1, 0, 1])
    memory = model.encode(features=feats)
    indexed = model.decode(tokens, memory, caption_index=index)
    repeated = model.decode(tokens, memory[index])
    assert_close_f32(indexed, repeated, roundings=TINY_MODEL_ROUNDINGS)  # other batch shapes may run other kernels


# ----------------------------------------------------------------------------- the reference's formulas, naively
def _pad_mask_rows_cols(T: int, pads: list[int]) -> torch.Tensor:
    """The reference's no-peak-and-pad mask: tril, then the last p rows and columns zeroed (Python loop)."""
    m = torch.ones(len(pads), T, T).tril()
    for b, p in enumerate(pads):
        if p:
            m[b, T - p:, :] = 0
            m[b, :, T - p:] = 0
    return m


def _ref_static(blk: StaticExpansionBlock, x: torch.Tensor, pads: list[int]) -> torch.Tensor:
    B, N, D = x.shape
    E = sum(blk.num_exp_list)
    M = torch.ones(B, E, N)
    for b, p in enumerate(pads):
        if p:
            M[b, :, N - p:] = 0
    Q = blk.query_exp_vectors.weight.expand(B, -1, -1)
    Bq = blk.bias_exp_vectors.weight.expand(B, -1, -1)
    Z = Q @ blk.key_embed(x).transpose(1, 2) / math.sqrt(D)
    A, Bm = F.relu(Z) * M, F.relu(-Z) * M
    A, Bm = A / (A.sum(-1, keepdim=True) + 1e-9), Bm / (Bm.sum(-1, keepdim=True) + 1e-9)
    va, vb = blk.values(x)
    Ca, Cb = A @ va + Bq, Bm @ vb + Bq
    Ab, Bb = F.relu(Z.transpose(1, 2)), F.relu(-Z.transpose(1, 2))
    start = 0
    for n in blk.num_exp_list:
        Ab[..., start:start + n] = Ab[..., start:start + n] / (Ab[..., start:start + n].sum(-1, keepdim=True) + 1e-9)
        Bb[..., start:start + n] = Bb[..., start:start + n] / (Bb[..., start:start + n].sum(-1, keepdim=True) + 1e-9)
        start += n
    k = len(blk.num_exp_list)
    s = torch.sigmoid(blk.selector_embed(x))
    return s * (Ab @ Ca / k) + (1 - s) * (Bb @ Cb / k)


def _ref_dynamic(blk: DynamicExpansionBlock, x: torch.Tensor, pads: list[int]) -> torch.Tensor:
    B, T, D = x.shape
    E = blk.num_exp
    M = _pad_mask_rows_cols(T, pads)
    c = blk.cond_embed(x).unsqueeze(2)
    Qe = (blk.query_exp_vectors.weight + c).reshape(B, T * E, D)
    Be = (blk.bias_exp_vectors.weight + c).reshape(B, T * E, D)
    Z = Qe @ blk.key_linear(x).transpose(1, 2) / math.sqrt(D)
    M1 = M.repeat_interleave(E, dim=1)
    A, Bm = F.relu(Z) * M1, F.relu(-Z) * M1
    A, Bm = A / (A.sum(-1, keepdim=True) + 1e-9), Bm / (Bm.sum(-1, keepdim=True) + 1e-9)
    va, vb = blk.values(x)
    Ca, Cb = A @ va, Bm @ vb
    M2 = M.repeat_interleave(E, dim=2)
    Ab, Bb = F.relu(Z.transpose(1, 2)) * M2, F.relu(-Z.transpose(1, 2)) * M2
    Ab, Bb = Ab / (Ab.sum(-1, keepdim=True) + 1e-9), Bb / (Bb.sum(-1, keepdim=True) + 1e-9)
    s = torch.sigmoid(blk.selector_embed(x))
    return s * (Ab @ (Ca + Be)) + (1 - s) * (Bb @ (Cb + Be))


@pytest.mark.parametrize("gated", [False, True])
def test_static_expansion_equals_reference_formula_with_padding(gated):
    torch.manual_seed(1)
    blk = StaticExpansionBlock(16, (2, 4, 8), dropout=0.0, gated=gated).eval()
    x = torch.randn(3, 7, 16)
    pads = [0, 2, 5]
    key_mask = torch.arange(7)[None, :] < torch.tensor([7 - p for p in pads])[:, None]
    ours = blk(x, key_mask)
    ref = _ref_static(blk, x, pads)
    for b, p in enumerate(pads):  # padded positions are never read by anything downstream
        # one block, the reference's formula in another order (masks, reassociated read-back)
        assert_close_f32(ours[b, :7 - p], ref[b, :7 - p], roundings=BLOCK_ROUNDINGS, scale=ref)


def test_static_expansion_reads_back_in_either_order_with_the_same_result():
    """In eval mode the read-back runs as (w @ a) @ v + w @ bias; in training as w @ dropout(a @ v + bias). Both
    orders give the same numbers when the dropout keeps everything."""
    torch.manual_seed(3)
    blk = StaticExpansionBlock(16, (2, 4, 8), dropout=0.0)
    w, a, v = torch.rand(3, 7, 14), torch.rand(3, 14, 7), torch.randn(3, 7, 16)
    bias = blk.bias_exp_vectors.weight
    reassociated = blk.eval()._read_back(w, a, v, bias, blk.dropout_class_a_fw)
    keeps_all = torch.nn.Dropout(0.5).eval()  # an active-looking dropout (p > 0) that keeps every value
    as_in_training = blk.train()._read_back(w, a, v, bias, keeps_all)
    # (w a) v + w bias vs w (a v + bias): products of 14 and 7 terms of values below 1 * 1 * |v|, |bias|
    scale = 14 * 7 * (v.abs().max() + bias.abs().max())
    assert_close_f32(reassociated, as_in_training, roundings=21, scale=scale)
    assert_close_f32(reassociated, w @ (a @ v + bias), roundings=21, scale=scale)


@pytest.mark.parametrize("gated", [False, True])
def test_dynamic_expansion_equals_reference_formula_at_real_positions(gated):
    torch.manual_seed(2)
    blk = DynamicExpansionBlock(16, 4, dropout=0.0, gated=gated).eval()
    x = torch.randn(3, 6, 16)
    pads = [0, 1, 3]
    ours = blk(x)
    ref = _ref_dynamic(blk, x, pads)
    for b, p in enumerate(pads):  # one block, the reference's formula in another order
        assert_close_f32(ours[b, :6 - p], ref[b, :6 - p], roundings=BLOCK_ROUNDINGS, scale=ref)


@pytest.mark.parametrize("slots", [0, 3])
def test_attention_equals_masked_softmax_with_memory_slots(slots):
    torch.manual_seed(3)
    mha = MultiHeadAttention(16, 4, memory_slots=slots).eval()
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    key_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out = mha(q, kv, key_mask)
    B, h, dk = 2, 4, 4
    k, v = mha.Wk(kv), mha.Wv(kv)
    mask = key_mask
    if slots:
        k = torch.cat([k, math.sqrt(dk) * mha.m_k.expand(B, -1, -1)], 1)
        v = torch.cat([v, math.sqrt(slots) * mha.m_v.expand(B, -1, -1)], 1)
        mask = torch.cat([key_mask, torch.ones(B, slots, dtype=torch.bool)], 1)
    qh = mha.Wq(q).view(B, 3, h, dk).transpose(1, 2)
    kh, vh = k.view(B, -1, h, dk).transpose(1, 2), v.view(B, -1, h, dk).transpose(1, 2)
    scores = (qh @ kh.transpose(-1, -2) / math.sqrt(dk)).masked_fill(~mask[:, None, None, :], -1e4)
    ref = mha.out_linear((scores.softmax(-1) @ vh).transpose(1, 2).reshape(B, 3, 16))
    assert_close_f32(out, ref, roundings=BLOCK_ROUNDINGS)  # one attention layer, fused vs written-out softmax


@pytest.mark.parametrize("init, scaled_std", [("xavier", None), ("m2", (1 / math.sqrt(16), 1 / math.sqrt(5)))])
def test_memory_slots_start_as_their_init_says_and_memory_attention_biases_start_at_zero(init, scaled_std):
    torch.manual_seed(0)
    model = build_model(tiny_config(end_to_end=False, memory_init=init, memory_slots=5, d_model=64, num_heads=4))
    mha = model.decoders[0].mha
    assert all(torch.count_nonzero(lin.bias) == 0 for lin in (mha.Wq, mha.Wk, mha.Wv, mha.out_linear))
    k = math.sqrt(mha.d_k) * mha.m_k
    v = math.sqrt(mha.memory_slots) * mha.m_v
    if scaled_std is None:  # xavier-uniform over (1, m, D): bound sqrt(6 / ((m + 1) D))
        bound = math.sqrt(6 / ((mha.memory_slots + 1) * 64))
        assert mha.m_k.abs().max() <= bound and mha.m_k.std() > 0.4 * bound
    else:
        assert k.std().item() == pytest.approx(scaled_std[0], rel=0.15)
        assert v.std().item() == pytest.approx(scaled_std[1], rel=0.15)
    plain = build_model(tiny_config(name="expansionnet_v2", end_to_end=False))
    assert torch.count_nonzero(plain.decoders[0].mha.Wq.bias) > 0  # the baseline keeps PyTorch's default biases


def test_backbone_tokens_read_channels_last_swin_and_channels_first_cnns_alike():
    from models.backbone import backbone_tokens, create_backbone
    from models.config import BackboneConfig, tiny_swinv2

    images = torch.randn(2, 3, 64, 64)
    cnn = create_backbone(BackboneConfig(name="resnet10t", img_size=64)).eval()
    grid = cnn.forward_features(images)  # (B, C, H', W') = (2, 512, 2, 2)
    tokens = backbone_tokens(cnn, images)
    assert tokens.shape == (2, grid.shape[2] * grid.shape[3], grid.shape[1])
    assert torch.equal(tokens[:, 1], grid[:, :, 0, 1])  # row-major positions, channels last
    swin = create_backbone(tiny_swinv2(img_size=64, embed_dim=16, depths=(1, 1), window_size=4)).eval()
    nhwc = swin.forward_features(images)  # (B, H', W', C)
    assert torch.equal(backbone_tokens(swin, images)[:, 1], nhwc[:, 0, 1])
