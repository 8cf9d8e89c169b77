"""Ensembles: members' word probabilities averaged at every step, each member with its own caches and backbone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_vocab
from numerics import TINY_MODEL_ROUNDINGS, assert_close_f32

from captioner import Captioner, load_captioner
from data.loaders import ImageSource
from data.records import ImageRecord
from data.vocab import Vocabulary
from deploy.checkpoints import save_model_checkpoint
from deploy.runtime import EnsembleRuntime, TorchRuntime
from engine.evaluate import caption_records
from models import build_model
from models.decoding import beam_search, greedy_search, sample

IDS = {"sos_idx": 1, "eos_idx": 2, "pad_idx": 0}
CPU = torch.device("cpu")


def _runtime(seed: int, name: str = "optimizer_expansionnet", **cfg_kw) -> TorchRuntime:
    torch.manual_seed(seed)
    cfg = tiny_config(name, end_to_end=False, **cfg_kw)
    return TorchRuntime(build_model(cfg).eval(), cfg, CPU, "fp32")


@torch.no_grad()
def test_ensemble_of_one_equals_the_single_model():
    single = _runtime(0)
    ensemble = EnsembleRuntime([single])
    feats = torch.randn(3, 6, 24)
    for search, kw in ((beam_search, {"beam_size": 3, "num_outputs": 3}), (greedy_search, {})):
        a = search(single, single.encode(features=feats), None, max_len=10, **IDS, **kw)
        b = search(ensemble, ensemble.encode(features=feats), None, max_len=10, **IDS, **kw)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.scores, b.scores)
    a = sample(single, single.encode(features=feats), None, num_samples=4, max_len=10,
               generator=torch.Generator().manual_seed(0), **IDS)
    b = sample(ensemble, ensemble.encode(features=feats), None, num_samples=4, max_len=10,
               generator=torch.Generator().manual_seed(0), **IDS)
    assert torch.equal(a.tokens, b.tokens)


@torch.no_grad()
def test_ensemble_of_two_copies_gives_the_single_models_captions():
    single, copy = _runtime(1), _runtime(1)
    ensemble = EnsembleRuntime([single, copy])
    feats = torch.randn(4, 6, 24)
    for search, kw in ((beam_search, {"beam_size": 4, "num_outputs": 2}), (greedy_search, {})):
        a = search(single, single.encode(features=feats), None, max_len=12, **IDS, **kw)
        b = search(ensemble, ensemble.encode(features=feats), None, max_len=12, **IDS, **kw)
        assert torch.equal(a.tokens, b.tokens)
        # the mean of two equal distributions, its log and the running sums: rounding of <= 12 steps' log-probs
        assert_close_f32(b.scores, a.scores, roundings=12 * TINY_MODEL_ROUNDINGS, scale=a.logprobs)


@torch.no_grad()
def test_averaged_step_distribution_is_the_mean_of_the_members_softmaxes():
    members = [_runtime(2), _runtime(3, "expansionnet_v2")]  # different architectures, one vocabulary
    ensemble = EnsembleRuntime(members)
    feats = torch.randn(2, 6, 24)
    stepper = ensemble.stepper(ensemble.encode(features=feats), None, 3, 5)
    tokens = torch.randint(3, members[0].vocab_size, (6, 4))
    prefix = torch.full((6, 1), IDS["sos_idx"])
    for t in range(4):
        got = stepper.logprobs(prefix).exp()
        want = torch.stack([F.softmax(m.model.decode(prefix, m.encode(features=feats).repeat_interleave(3, 0))[:, -1],
                                      -1) for m in members]).mean(0)
        assert_close_f32(got, want, roundings=TINY_MODEL_ROUNDINGS)  # cached steps vs full prefixes: another sum order
        index = torch.tensor([2, 0, 1, 3, 3, 4])  # a beam re-ordering: every member follows it
        stepper.reorder(index)
        prefix = torch.cat([prefix.index_select(0, index), tokens[:, t:t + 1]], dim=1)


def _save(tmp_path, name, cfg, vocab, seed):
    torch.manual_seed(seed)
    return save_model_checkpoint(tmp_path / name, build_model(cfg), cfg, vocab)


def test_members_with_another_vocabulary_are_refused_naming_the_file(tmp_path):
    vocab = tiny_vocab()
    other = Vocabulary([*vocab.tokens[:-1], "zebra"])
    a = _save(tmp_path, "a.pth", tiny_config(end_to_end=False), vocab, 0)
    b = _save(tmp_path, "b.pth", tiny_config(end_to_end=False), other, 1)
    with pytest.raises(ValueError, match=r"share one vocabulary: .*b\.pth has token \d+ 'zebra'"):
        load_captioner([a, b])
    c = _save(tmp_path, "c.pth", tiny_config(end_to_end=False, vocab_size=len(vocab) + 1),
              Vocabulary([*vocab.tokens, "zebra"]), 2)
    with pytest.raises(ValueError, match=r"c\.pth has 17 tokens instead of 16"):
        load_captioner([a, c])


def test_ensemble_of_different_backbones_captions_images_with_every_search(tmp_path):
    vocab = tiny_vocab()
    a = _save(tmp_path, "seed.pth", tiny_config(), vocab, 0)  # SwinV2, 32 px
    b = _save(tmp_path, "v2.pth", tiny_config("expansionnet_v2", img_size=64), vocab, 1)  # another size
    cap = load_captioner([a, b])
    assert cap.backend == "ensemble"
    images = [torch.rand(3, 80, 60).permute(1, 2, 0).mul(255).byte().numpy() for _ in range(2)]
    from PIL import Image

    pil = [Image.fromarray(x) for x in images]
    beam = cap.caption(pil, beam_size=3, max_len=6, num_captions=2)
    greedy = cap.caption(pil, max_len=6, method="greedy")
    drawn = cap.caption(pil, max_len=6, num_captions=3, method="sample", generator=torch.Generator().manual_seed(0))
    assert [len(c) for c in beam] == [2, 2] and [len(c) for c in greedy] == [1, 1] and [len(c) for c in drawn] == [3, 3]
    assert beam[0][0].score >= beam[0][1].score and drawn[0][0].score >= drawn[0][2].score
    with pytest.raises(ValueError, match="save ensemble members one by one"):
        cap.save_pretrained(tmp_path / "x")


def test_evaluation_captions_a_split_with_an_ensemble(tmp_path):
    vocab = tiny_vocab()
    a = _save(tmp_path, "a.pth", tiny_config(), vocab, 0)
    b = _save(tmp_path, "b.pth", tiny_config(), vocab, 1)
    from PIL import Image

    records = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 30), (60 * i, 20, 200 - 50 * i)).save(path)
        records.append(ImageRecord(i, path, ("a red circle",), "test"))
    ensemble = load_captioner([a, b])
    source = ImageSource(backbone=ensemble.config.backbone)
    preds, skipped = caption_records(ensemble.runtime, records, vocab, source, beam_size=2, max_len=6, batch_size=2,
                                     device=CPU, progress=False)
    assert not skipped
    expected = ensemble.caption([r.path for r in records], beam_size=2, max_len=6)
    assert preds == {r.image_id: c[0].text for r, c in zip(records, expected)}
    # a plain model still works as before
    single = load_captioner(a, backend="torch")
    preds_a, _ = caption_records(single.model, records, vocab, source, beam_size=2, max_len=6, batch_size=3,
                                 device=CPU, progress=False)
    assert preds_a == {r.image_id: c[0].text for r, c in
                       zip(records, single.caption([r.path for r in records], beam_size=2, max_len=6))}
    assert isinstance(single, Captioner) and single.backend == "torch"


def test_for_captioning_prepares_a_loaded_model_and_the_constructor_leaves_a_model_as_it_is():
    """TorchRuntime.for_captioning (what the loaders build with) puts the model in eval mode and packs its decoding
    step on the CPU; the plain constructor (engine.evaluate wraps a model that goes on training) changes nothing,
    and without a config it still describes itself, or says plainly what it cannot know."""
    from models.cpu_packing import PackedLinear

    torch.manual_seed(0)
    cfg = tiny_config(end_to_end=False)
    training = build_model(cfg)
    plain = TorchRuntime(training, None, CPU, "fp32")
    assert training.training and type(training.vocab_linear) is torch.nn.Linear
    assert training.vocab_linear.weight.is_contiguous()
    assert plain.preprocessing is None and plain.info()["name"] is None  # features only, no config
    loaded = TorchRuntime.for_captioning(build_model(cfg), cfg, CPU)
    assert not loaded.model.training and loaded.precision == "fp32"
    assert isinstance(loaded.model.vocab_linear, PackedLinear) and loaded.model.decoders[0].dyn_exp.joint_projections
    with pytest.raises(ValueError, match="without its ModelConfig"):
        TorchRuntime(build_model(tiny_config()), None, CPU, "fp32").preprocessing  # noqa: B018 - the property raises
