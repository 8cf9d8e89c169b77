"""Decoding: incremental (cached) decoding is exact, and the searches keep the reference's semantics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from numerics import TINY_MODEL_ROUNDINGS, assert_close_f32, linear_error_scale

from models import build_model
from models.cpu_packing import (
    KEPT_PACKINGS,
    JointPackedLinear,
    PackedLinear,
    mkl_packed_gemm_available,
    prepare_for_cpu_decoding,
)
from models.decoding import TorchStepper, _top_k, beam_search, greedy_search, sample
from models.dynamic_expansion import ConcatExpansionCache, cached_rows

IDS = {"sos_idx": 1, "eos_idx": 2, "pad_idx": 0}
MODELS = ["optimizer_expansionnet", "expansionnet_v2"]


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_config(name, end_to_end=False)).eval()


@pytest.mark.parametrize("name", MODELS)
def test_cached_logprobs_equal_full_recomputation_at_every_step(name):
    model = _model(name)
    feats = torch.randn(3, 6, 24)
    tokens = torch.randint(3, model.vocab_size, (3, 12))
    with torch.no_grad():
        memory = model.encode(features=feats)
        full = F.log_softmax(model.decode(tokens, memory), -1)
        cache = model.init_cache(memory, None, group=1, max_len=12)
        for j in range(12):
            step = F.log_softmax(model.decode_step(tokens[:, j], cache), -1)
            prefix = F.log_softmax(model.decode(tokens[:, : j + 1], memory)[:, -1], -1)
            # the same model in another summation order: rounding of a tiny captioner (numerics.TINY_MODEL_ROUNDINGS)
            assert_close_f32(step, full[:, j], roundings=TINY_MODEL_ROUNDINGS)
            assert_close_f32(step, prefix, roundings=TINY_MODEL_ROUNDINGS)


@pytest.mark.parametrize("name", MODELS)
def test_beam_search_cached_equals_uncached(name):
    model = _model(name, seed=1)
    memory = model.encode(features=torch.randn(4, 6, 24))
    kw = dict(IDS, beam_size=4, max_len=10, num_outputs=4)
    cached = beam_search(model, memory, None, use_cache=True, **kw)
    full = beam_search(model, memory, None, use_cache=False, **kw)
    assert torch.equal(cached.tokens, full.tokens)
    # sums of <= 10 step log-probs, each a tiny captioner's output in another summation order
    assert_close_f32(cached.scores, full.scores, roundings=10 * TINY_MODEL_ROUNDINGS, scale=full.logprobs)
    assert_close_f32(cached.logprobs, full.logprobs, roundings=TINY_MODEL_ROUNDINGS)


@pytest.mark.parametrize("name", MODELS)
def test_beam_size_one_equals_greedy(name):
    model = _model(name, seed=2)
    memory = model.encode(features=torch.randn(5, 6, 24))
    beam = beam_search(model, memory, None, beam_size=1, max_len=9, **IDS)
    greedy = greedy_search(model, memory, None, max_len=9, **IDS)
    assert torch.equal(beam.tokens, greedy.tokens)
    # the same steps on one hypothesis per image either way, summed in another order: <= 9 log-probs' rounding
    assert_close_f32(beam.scores, greedy.scores, roundings=9 * TINY_MODEL_ROUNDINGS, scale=greedy.logprobs)


def test_beam_outputs_are_ordered_by_length_normalised_score_and_distinct():
    model = _model("optimizer_expansionnet", seed=3)
    memory = model.encode(features=torch.randn(3, 6, 24))
    out = beam_search(model, memory, None, beam_size=5, max_len=8, num_outputs=5, **IDS)
    assert (out.scores[:, :-1] >= out.scores[:, 1:]).all()
    # score = cumulative log-prob / (generated tokens + SOS)
    # a running sum of <= 8 float32 log-probs against their sum in one go: 8 roundings of the largest
    assert_close_f32(out.scores, out.logprobs.sum(-1) / (out.lengths + 1).float(), roundings=8, scale=out.logprobs)
    for b in range(3):
        rows = {tuple(out.tokens[b, i, : out.lengths[b, i]].tolist()) for i in range(5)}
        assert len(rows) == 5


def test_eos_ends_captions_and_padding_follows():
    model = _model("expansionnet_v2", seed=4)
    with torch.no_grad():
        model.vocab_linear.bias[IDS["eos_idx"]] = 50.0  # EOS is overwhelmingly likely at once
    memory = model.encode(features=torch.randn(2, 6, 24))
    out = beam_search(model, memory, None, beam_size=3, max_len=10, num_outputs=3, **IDS)
    assert out.tokens.shape[-1] < 10  # stopped early: every hypothesis finished
    assert (out.lengths[:, 0] == 1).all() and (out.tokens[:, 0, 0] == IDS["eos_idx"]).all()
    assert (out.tokens[:, 0, 1:] == IDS["pad_idx"]).all()
    assert (out.logprobs[:, 0, 1:] == 0).all()


def test_max_length_is_respected_without_eos():
    model = _model("optimizer_expansionnet", seed=5)
    with torch.no_grad():
        model.vocab_linear.bias[IDS["eos_idx"]] = -50.0  # EOS never wins
    memory = model.encode(features=torch.randn(2, 6, 24))
    for out in (beam_search(model, memory, None, beam_size=2, max_len=7, **IDS),
                greedy_search(model, memory, None, max_len=7, **IDS)):
        assert out.tokens.shape[-1] == 7 and (out.lengths == 7).all()
        assert not (out.tokens == IDS["eos_idx"]).any()


def test_sampling_draws_k_captions_per_image_reproducibly_and_pads_after_eos():
    model = _model("optimizer_expansionnet", seed=6)
    memory = model.encode(features=torch.randn(3, 6, 24))
    a = sample(model, memory, None, num_samples=5, max_len=12, generator=torch.Generator().manual_seed(0), **IDS)
    b = sample(model, memory, None, num_samples=5, max_len=12, generator=torch.Generator().manual_seed(0), **IDS)
    c = sample(model, memory, None, num_samples=5, max_len=12, use_cache=False,
               generator=torch.Generator().manual_seed(0), **IDS)
    assert a.tokens.shape[:2] == (3, 5)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens)
    assert len({tuple(r) for r in a.tokens.flatten(0, 1).tolist()}) > 1  # samples differ
    for row, n in zip(a.tokens.flatten(0, 1), a.lengths.flatten()):
        assert (row[n:] == IDS["pad_idx"]).all()
        if n < row.numel():
            assert row[n - 1] == IDS["eos_idx"]
    # the per-token log-probs are those of the model under teacher forcing
    toks = a.tokens.flatten(0, 1)
    inputs = torch.cat([torch.full_like(toks[:, :1], IDS["sos_idx"]), toks[:, :-1]], 1)
    logp = F.log_softmax(model.decode(inputs, memory.repeat_interleave(5, 0)), -1).gather(-1, toks[..., None])[..., 0]
    mask = torch.arange(toks.shape[1])[None] < a.lengths.flatten()[:, None]
    # cached steps vs one teacher-forced pass: another summation order
    assert_close_f32(a.logprobs.flatten(0, 1), logp * mask, roundings=TINY_MODEL_ROUNDINGS)


def test_decoder_rejects_lengths_beyond_position_embeddings():
    model = _model("expansionnet_v2")
    memory = model.encode(features=torch.randn(1, 6, 24))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.init_cache(memory, None, group=1, max_len=model.max_seq_len + 1)


@pytest.mark.parametrize("name", MODELS)
def test_functional_step_on_concatenated_caches_equals_decode_step_on_buffers(name):
    """The form an exported decoder-step graph runs (past caches in, present out) is the same computation."""
    model = _model(name, seed=7)
    memory = model.encode(features=torch.randn(2, 6, 24))
    tokens = torch.randint(3, model.vocab_size, (6, 5))
    with torch.no_grad():
        cache = model.init_cache(memory, None, group=3, max_len=5)
        past = [{n: torch.zeros(6, 0, model.d_model) for n in cached_rows(model.num_exp_dec)} for _ in model.decoders]
        for j in range(5):
            buffered = model.decode_step(tokens[:, j], cache)
            dyn = [ConcatExpansionCache(p) for p in past]
            functional = model.step(tokens[:, j], torch.tensor([j]), cache.cross, dyn)
            # another cache layout: another summation order
            assert_close_f32(functional, buffered, roundings=TINY_MODEL_ROUNDINGS)
            past = [d.present for d in dyn]
        rows = cached_rows(model.num_exp_dec)  # the table the exported graph's tensors follow: rows per position
        assert {n: t.shape[1] for n, t in past[0].items()} == {n: 5 * r for n, r in rows.items()}


@pytest.mark.parametrize("name", MODELS)
def test_reordered_hypotheses_read_their_ancestors_rows_like_a_full_recomputation_of_their_history(name):
    """A beam re-ordering moves only the ancestry table: after re-orderings that copy some hypotheses and drop
    others (as beam search does), every hypothesis's step log-probs are those of its own token history recomputed
    from scratch."""
    model = _model(name, seed=11)
    memory = model.encode(features=torch.randn(2, 6, 24))
    group, steps = 3, 6
    orders = [[0, 0, 1], [2, 2, 2], [1, 0, 2], [0, 1, 1], [2, 0, 0], [0, 1, 2]]
    with torch.no_grad():
        cache = model.init_cache(memory, None, group=group, max_len=steps)
        history = torch.full((2 * group, 1), IDS["sos_idx"])
        for j in range(steps):
            step = F.log_softmax(model.decode_step(history[:, -1], cache), -1)
            full = F.log_softmax(model.decode(history, memory.repeat_interleave(group, 0))[:, -1], -1)
            assert_close_f32(step, full, roundings=TINY_MODEL_ROUNDINGS)  # cached step vs full prefix: other sum order
            index = torch.tensor(orders[j] + [group + i for i in reversed(orders[j])])
            history = torch.cat([history.index_select(0, index), torch.randint(3, model.vocab_size, (2 * group, 1))], 1)
            cache.reorder(index)


def test_preparing_for_cpu_decoding_keeps_the_weights_and_the_captions():
    """prepare_for_cpu_decoding (packed GEMM, (in, out) memory order, joint step projections) changes how products
    run, not what they compute: the state dict's values, and the beam's captions and log-probs, stay."""
    from utils.checkpoint import state_dict_sha256

    model = _model("expansionnet_v2", seed=12)
    memory = model.encode(features=torch.randn(3, 6, 24))
    before = beam_search(model, memory, None, beam_size=3, max_len=8, **IDS)
    digest, keys = state_dict_sha256(model.state_dict()), list(model.state_dict())
    prepare_for_cpu_decoding(model)
    assert isinstance(model.vocab_linear, PackedLinear) and isinstance(model.decoders[0].ff.linear_1, PackedLinear)
    block = model.decoders[0].dyn_exp
    assert block.joint_projections.linears == block.step_projections()
    assert all(isinstance(linear, PackedLinear) for linear in block.step_projections())
    assert model.vocab_linear.weight.t().is_contiguous()
    assert type(model.encoders[0].ff.linear_1) is torch.nn.Linear  # the encoder's products have many rows
    assert model.encoders[0].ff.linear_1.weight.is_contiguous()
    assert state_dict_sha256(model.state_dict()) == digest and list(model.state_dict()) == keys
    after = beam_search(model, memory, None, beam_size=3, max_len=8, **IDS)
    assert torch.equal(after.tokens, before.tokens)
    assert_close_f32(after.logprobs, before.logprobs, roundings=TINY_MODEL_ROUNDINGS)  # packed GEMM: other kernels


@pytest.mark.skipif(not mkl_packed_gemm_available(), reason="MKL's packed GEMM (x86 builds of PyTorch with MKL)")
def test_packed_linear_packs_per_row_count_follows_weight_updates_and_leaves_gradients_to_f_linear():
    torch.manual_seed(13)
    linear = torch.nn.Linear(32, 24)
    packed = PackedLinear.replacing(linear)
    assert packed.weight is linear.weight
    x = torch.randn(5, 1, 32)
    with torch.no_grad():
        # products of 32 terms (+ bias) in two kernels: each within 33 roundings of sum |w_i x_i| + |b|
        assert_close_f32(packed(x), linear(x), roundings=66, scale=linear_error_scale(linear.weight, x, linear.bias))
        assert_close_f32(packed(x[:3]), linear(x[:3]), roundings=66,
                         scale=linear_error_scale(linear.weight, x[:3], linear.bias))
        assert {k[0] for k in packed.packings.kept} == {5, 3}
        linear.weight.mul_(2.0)  # an in-place update (load_state_dict, an optimizer step) re-packs
        assert_close_f32(packed(x), linear(x), roundings=66, scale=linear_error_scale(linear.weight, x, linear.bias))
        for rows in range(6, 12):
            packed(torch.randn(rows, 32))
        assert len(packed.packings) == KEPT_PACKINGS
    y = packed(x)  # with gradients: F.linear, so they flow to the shared parameters
    y.sum().backward()
    assert linear.weight.grad is not None and y.grad_fn is not None


@pytest.mark.skipif(not mkl_packed_gemm_available(), reason="MKL's packed GEMM (x86 builds of PyTorch with MKL)")
def test_joint_packed_projections_equal_each_linear_and_follow_weight_and_bias_updates():
    """JointPackedLinear: one packed product of several layers' weights side by side gives each one's output (up to
    the rounding of another kernel), re-packs when a weight or a bias changes in place, and leaves gradients to the
    layers themselves."""
    torch.manual_seed(17)
    linears = tuple(PackedLinear.replacing(torch.nn.Linear(32, out)) for out in (24, 24, 40))
    joint, x = JointPackedLinear(linears), torch.randn(6, 1, 32)
    with torch.no_grad():
        for update in (None, lambda: linears[1].weight.mul_(2.0), lambda: linears[2].bias.add_(1.0)):
            if update is not None:
                update()
            outs = joint(x)
            assert [o.shape[-1] for o in outs] == [24, 24, 40]
            for out, linear in zip(outs, linears):  # products of 32 terms (+ bias) in two kernels
                assert_close_f32(out, linear(x), roundings=66, scale=linear_error_scale(linear.weight, x, linear.bias))
        assert len(joint.packings) == 3
    outs = joint(x)  # with gradients: each layer on its own (F.linear)
    assert all(o.grad_fn is not None for o in outs) and len(joint.packings) == 3


def test_a_cache_made_for_a_search_that_never_reorders_keeps_plain_rows_and_refuses_a_reordering():
    model = _model("expansionnet_v2", seed=14)
    memory = model.encode(features=torch.randn(2, 6, 24))
    tokens = torch.randint(3, model.vocab_size, (6, 4))
    with torch.no_grad():
        plain = model.init_cache(memory, None, group=3, max_len=4, reorders=False)
        beam = model.init_cache(memory, None, group=3, max_len=4)
        assert plain.dyn[0].ancestry.group == 1 and beam.dyn[0].ancestry.group == 3
        for j in range(4):
            assert_close_f32(model.decode_step(tokens[:, j], plain), model.decode_step(tokens[:, j], beam),
                             roundings=TINY_MODEL_ROUNDINGS)  # rows read in place vs per hypothesis: other sum order
        with pytest.raises(RuntimeError, match="never re-orders"):
            plain.reorder(torch.arange(6))


def test_the_cache_type_and_its_step_are_chosen_where_the_cache_is_made():
    """Eval mode: forward-weights caches, which keep the forward step's weights (T columns) instead of Ca, Cb
    (D columns), with log-probs of the Ca path (the fixed-size caches keep Ca). Training mode (a dropout may act on
    Ca): each hypothesis's own rows, Ca and Cb included; no beam re-orderings; a cache made in eval mode refuses a
    training-mode step."""
    from models.dynamic_expansion import ForwardWeightsCache, PrefixExpansionCache

    torch.manual_seed(16)
    model = build_model(tiny_config("expansionnet_v2", end_to_end=False, dec_drop=0.3)).eval()
    memory = model.encode(features=torch.randn(2, 6, 24))
    tokens = torch.randint(3, model.vocab_size, (6, 5))
    with torch.no_grad():
        growing = model.init_cache(memory, None, group=3, max_len=5)
        fixed = model.init_cache(memory, None, group=3, max_len=5, fixed=True)
        for j in range(5):
            assert_close_f32(model.decode_step(tokens[:, j], growing), model.decode_step(tokens[:, j], fixed),
                             roundings=TINY_MODEL_ROUNDINGS)  # (w Fa) Va vs w (Fa Va): another association
        assert isinstance(growing.dyn[0], ForwardWeightsCache)
        assert set(growing.dyn[0].tensors) == {"k", "cond", "v", "f"}
        assert growing.dyn[0].tensors["f"].shape[-1] == 2 * 5  # one column per position and class, not d_model
        stale = model.init_cache(memory, None, group=3, max_len=5)
        model.train()
        training = model.init_cache(memory, None, group=3, max_len=5, reorders=False)
        model.decode_step(tokens[:, 0], training)
        assert isinstance(training.dyn[0], PrefixExpansionCache)
        assert {n: t.shape[1] for n, t in training.dyn[0].tensors.items()} == {
            n: 5 * rows for n, rows in cached_rows(model.num_exp_dec).items()}
        with pytest.raises(ValueError, match="eval mode"):
            model.init_cache(memory, None, group=3, max_len=5)
        with pytest.raises(RuntimeError, match="eval mode only"):
            model.decode_step(tokens[:, 0], stale)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("fixed", [False, True])
def test_training_mode_steps_equal_the_full_prefix_forward_in_training_mode(name, fixed):
    """The step SCST sampling runs (training mode: each hypothesis's own rows, eager or compiled-shaped) gives, with
    dropouts at 0, the log-probs of the teacher-forced forward pass over the whole prefix in training mode."""
    model = _model(name, seed=18).train()
    memory = model.encode(features=torch.randn(2, 6, 24))
    tokens = torch.randint(3, model.vocab_size, (6, 7))
    with torch.no_grad():
        cache = model.init_cache(memory, None, group=3, max_len=7, fixed=fixed, reorders=False)
        full = F.log_softmax(model.decode(tokens, memory.repeat_interleave(3, 0)), -1)
        for j in range(7):
            step = F.log_softmax(model.decode_step(tokens[:, j], cache), -1)
            assert_close_f32(step, full[:, j], roundings=TINY_MODEL_ROUNDINGS)  # another summation order


@pytest.mark.parametrize("n,k", [(50000, 5), (50035, 5), (30021, 3), (600, 3), (1000, 1), (12, 2)])
def test_the_beams_chunked_top_k_equals_a_plain_top_k_including_the_tail_and_dead_hypotheses(n, k):
    """Values and indices as torch.topk gives them: with a tail that fills no chunk (n not a multiple of the chunk
    size), the winners in that tail, and rows of -inf (beam slots not live yet) over half of the scores."""
    torch.manual_seed(n)
    for trial in range(6):
        scores = torch.randn(4, n)
        if trial % 2:
            scores[:, : n // 2] = float("-inf")
        if trial % 3 == 0:
            scores[:, -7:] += 10.0
        expected = scores.topk(k, dim=-1)
        values, indices = _top_k(scores, k)
        assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("vocab_size", [None, 3])
def test_beam_search_computing_the_first_step_once_per_image_gives_the_every_hypothesis_results(name, vocab_size,
                                                                                              monkeypatch):
    """The first step runs on one row per image (its hypotheses are one until then): same tokens, log-probs and
    scores as when every hypothesis computes it, also with fewer words than beams (the first top-k then reaches
    the dead slots)."""
    torch.manual_seed(21)
    model = build_model(tiny_config(name, end_to_end=False, vocab_size=vocab_size)).eval()
    memory = model.encode(features=torch.randn(3, 6, 24))
    kw = dict(IDS, beam_size=5, max_len=6, num_outputs=3)
    once = beam_search(model, memory, None, **kw)
    steppers = []
    original = TorchStepper.__init__

    def every_hypothesis(self, *args, **kwargs):
        original(self, *args, **kwargs)
        steppers.append(self.first_step_per_image)
        self.first_step_per_image = False

    monkeypatch.setattr(TorchStepper, "__init__", every_hypothesis)
    each = beam_search(model, memory, None, **kw)
    assert steppers == [True]
    assert torch.equal(once.tokens, each.tokens)
    # one row per image vs one per hypothesis: products of other row counts may run other kernels
    assert_close_f32(once.logprobs, each.logprobs, roundings=TINY_MODEL_ROUNDINGS)
    assert_close_f32(once.scores, each.scores, roundings=6 * TINY_MODEL_ROUNDINGS, scale=each.logprobs)
