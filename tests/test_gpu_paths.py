"""The GPU code paths, exercised on the CPU: bf16 autocast and torch.compile in every training mode, in decoding, in
feature extraction and in the API; CUDA's autocast and device placement on fake CUDA tensors; and the same checks on
a real GPU (marked gpu, skipped without CUDA; benchmarks/gpu_check.sh runs them).

torch.compile runs here with the aot_eager backend (dynamo's graph capture, guards and recompilation, AOTAutograd's
functionalisation and backward, without inductor's C++ code generation, which takes a minute per graph on two
cores); the gpu tests use inductor itself. No test asserts a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_dataset, tiny_config, tiny_vocab

import data_generator
import engine.trainer as engine_trainer
from data.loaders import CaptionBatch
from data.records import ImageRecord
from engine.evaluate import EVAL_PRECISION
from engine.regimes import build_regime
from engine.setup import TrainConfig
from engine.trainer import RunPlan, TrainData, Trainer
from models import build_model
from models import decoding as decoding_module
from models.decoding import beam_search, greedy_search, sample
from optims import ScheduleConfig, build_optimizer
from utils.dist import DistInfo
from utils.runtime import autocast

IDS = {"sos_idx": 1, "eos_idx": 2, "pad_idx": 0}
CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
MODES = ["xe-features", "xe-e2e", "scst-features", "scst-e2e"]
CAPTIONS = ("a red circle", "two blue squares", "a green triangle left of a red square", "the blue circle",
            "a red square and a green circle")


# ----------------------------------------------------------------------------------------------------------- helpers
class GraphCounter:
    """A torch.compile backend that counts the graphs dynamo hands it (one per compilation) and runs them with
    aot_eager (or another backend)."""

    def __init__(self, inner: str = "aot_eager") -> None:
        self.graphs = 0
        self.inner = torch._dynamo.lookup_backend(inner)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1
        return self.inner(gm, example_inputs)


@pytest.fixture
def dynamo() -> Iterator[None]:
    """A clean dynamo state for each compile test (compiled code is cached per function across models), and no graph
    break counted from elsewhere."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graph_breaks() -> dict:
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def tiny_model(end_to_end: bool, seed: int = 0, device: torch.device = CPU, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tiny_config(end_to_end=end_to_end, **{"N_enc": 1, "N_dec": 1, **overrides})
    return build_model(cfg).to(device), cfg


def refs_of(image: int) -> tuple[str, ...]:
    """Two references per image, different from image to image (CIDEr-D's document frequencies need that)."""
    return CAPTIONS[image % len(CAPTIONS)], CAPTIONS[(image + 2) % len(CAPTIONS)]


def caption_batch(vocab, end_to_end: bool, images: int, device: torch.device = CPU, seed: int = 0) -> CaptionBatch:
    """`images` images (32 px) or feature maps (6 x 24), two captions each, as the loader gives them."""
    g = torch.Generator().manual_seed(seed)
    caps = [CAPTIONS[(i + j) % len(CAPTIONS)] for i in range(images) for j in range(2)]
    encoded = [vocab.encode(c) for c in caps]
    tokens = torch.full((len(caps), max(map(len, encoded))), vocab.pad_idx, dtype=torch.long)
    for row, e in enumerate(encoded):
        tokens[row, :len(e)] = torch.tensor(e)
    visual = torch.randn(images, 3, 32, 32, generator=g) if end_to_end else torch.randn(images, 6, 24, generator=g)
    batch = CaptionBatch(list(range(images)), visual if end_to_end else None, None if end_to_end else visual, tokens,
                         torch.arange(images).repeat_interleave(2),
                         [refs_of(i) for i in range(images)])
    return batch.to(device)


def make_trainer(model: torch.nn.Module, cfg, mode: str, precision: str, tmp_path: Path,
                 device: torch.device = CPU) -> Trainer:
    """A Trainer for one mode with what its steps need (no data loader: the tests hand it batches)."""
    reinforce = mode.startswith("scst")
    vocab = tiny_vocab()
    raw = getattr(model, "_orig_mod", model)
    run = TrainConfig(reinforce=reinforce, num_epochs=1, eval_beam_sizes=(2,), eval_batch_size=4, print_every_iter=1,
                      save_every_minutes=100.0, scst_samples=3, scst_max_len=6)
    plan = RunPlan(tmp_path / mode, ScheduleConfig("fixed", 1e-3, 1, 1.0, 1.0, iters_per_epoch=10), precision,
                   eval_max_len=6)
    records = [ImageRecord(i, tmp_path / f"{i}.png", refs_of(i), "train") for i in range(len(CAPTIONS))]
    regime = build_regime(reinforce, vocab=vocab, vocab_size=cfg.vocab_size, train_records=records, scst_samples=3,
                          scst_max_len=6)
    return Trainer(model, regime, build_optimizer(raw.parameters(), "radam", 1e-3),
                   TrainData(records, [], None, None, lambda s: []), run, plan, DistInfo(device=device), cfg, vocab)


def one_step(trainer: Trainer, batch: CaptionBatch, seed: int = 0) -> dict[str, float]:
    """One optimizer step over one micro-batch, as the training loop runs it; returns the step's terms."""
    torch.manual_seed(seed)
    sums: dict[str, float] = {}
    trainer._run_window([batch], sums)
    return sums


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in getattr(model, "_orig_mod", model).state_dict().items()}


def step_checks(before: dict[str, torch.Tensor], model: torch.nn.Module, terms: dict[str, float], mode: str) -> None:
    """The step trained: finite terms, fp32 weights that moved and stayed finite (the backbone's too end to end)."""
    assert terms and all(np.isfinite(v) for v in terms.values()), terms
    after = weights(model)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert all(v.dtype == before[k].dtype and torch.isfinite(v).all() for k, v in after.items())
    assert any(k.startswith("decoders.") for k in moved) and any(k.startswith("encoders.") for k in moved)
    if mode.endswith("e2e"):
        assert any(k.startswith("swin_transf.") for k in moved)


# ------------------------------------------------------------------------------------------- training, bf16 and compile
@pytest.mark.parametrize("mode", MODES)
def test_train_step_under_bf16_autocast_in_every_mode(tmp_path, mode):
    """Each mode's step under bf16 autocast trains the fp32 weights, with the fp32 step's loss to bf16's precision."""
    e2e = mode.endswith("e2e")
    figures = {}
    for precision in ("fp32", "bf16"):
        model, cfg = tiny_model(e2e)
        trainer = make_trainer(model, cfg, mode, precision, tmp_path / precision)
        before = weights(model)
        terms = one_step(trainer, caption_batch(trainer.vocab, e2e, 3))
        step_checks(before, model, terms, mode)
        figures[precision] = terms
    key = "reward_sum" if mode.startswith("scst") else "loss_sum"
    if key == "loss_sum":  # SCST samples other captions under bf16, so its reward is not comparable
        assert figures["bf16"][key] == pytest.approx(figures["fp32"][key], rel=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_train_step_compiled_under_bf16_in_every_mode(tmp_path, monkeypatch, dynamo, mode):
    """train.py --compile True (torch.compile of the model) with bf16: no graph break, SCST's encoder, sampling
    steps and re-scoring compiled too, nothing compiled again at the next step of the same shapes, and the step of
    the eager model (the same weights, the same batch)."""
    counter = GraphCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    e2e = mode.endswith("e2e")
    batch = caption_batch(tiny_vocab(), e2e, 3)
    model, cfg = tiny_model(e2e)
    compiled_model = torch.compile(model)
    trainer = make_trainer(compiled_model, cfg, mode, "bf16", tmp_path / "compiled")
    assert trainer.step_context.compiled
    before = weights(model)
    terms = one_step(trainer, batch)
    step_checks(before, model, terms, mode)
    compiled_graphs = counter.graphs
    assert compiled_graphs >= (3 if mode.startswith("scst") else 1)  # SCST: encoder, sampling step, re-scoring
    assert not graph_breaks()
    one_step(trainer, batch, seed=1)
    assert counter.graphs == compiled_graphs  # the second step reuses every graph
    eager, _ = tiny_model(e2e)
    eager_terms = one_step(make_trainer(eager, cfg, mode, "bf16", tmp_path / "eager"), batch)
    if mode.startswith("xe"):
        assert terms["loss_sum"] == pytest.approx(eager_terms["loss_sum"], rel=0.01)


def test_validation_decodes_in_fp32_while_training_runs_under_bf16(tmp_path, monkeypatch):
    """The trainer's validation captions at evaluation's precision (fp32, like test.py), not training's bf16, so the
    CIDEr-D that picks best.pth is comparable with test.py's."""
    model, cfg = tiny_model(False)
    trainer = make_trainer(model, cfg, "xe-features", "bf16", tmp_path)
    trainer.data = dataclasses.replace(trainer.data, val=trainer.data.train[:2])
    asked, default = [], inspect.signature(engine_trainer.caption_records).parameters["precision"].default

    def caption_records_spy(*args, **kwargs):
        asked.append(kwargs.get("precision", default))
        return {r.image_id: CAPTIONS[0] for r in trainer.data.val}, []

    monkeypatch.setattr(engine_trainer, "caption_records", caption_records_spy)
    trainer.evaluate()
    assert asked == [EVAL_PRECISION] and EVAL_PRECISION == "fp32"


def test_is_compiled_sees_through_wrappers():
    from engine.trainer import is_compiled

    model, _ = tiny_model(False)
    assert not is_compiled(model)
    wrapped = torch.compile(model)
    assert is_compiled(wrapped)
    holder = torch.nn.Module()
    holder.module = wrapped  # what DistributedDataParallel looks like from outside
    assert is_compiled(holder)


# ------------------------------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("name", ["optimizer_expansionnet", "expansionnet_v2"])
def test_fixed_size_cache_steps_equal_the_growing_cache_steps(name):
    """The compile-friendly caches (whole max_len buffers, unwritten positions masked) give the eager step's
    log-probs at every position, beam re-orderings included."""
    torch.manual_seed(3)
    model = build_model(tiny_config(name, end_to_end=False)).eval()
    memory = model.encode(features=torch.randn(2, 6, 24))
    tokens = torch.randint(3, model.vocab_size, (6, 7))
    with torch.no_grad():
        growing = model.init_cache(memory, None, group=3, max_len=7)
        fixed = model.init_cache(memory, None, group=3, max_len=7, fixed=True)
        for j in range(7):
            a = model.decode_step(tokens[:, j], growing)
            b = model.decode_step(tokens[:, j], fixed)
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
            order = torch.randperm(3)
            index = torch.cat([order, order + 3])
            growing.reorder(index)
            fixed.reorder(index)


def _scores_in_fp32(model, memory: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Beam search's ranking score of captions (B, n, L) under the fp32 model: summed log-probs / (length + 1)."""
    B, n, L = tokens.shape
    flat = tokens.flatten(0, 1)
    inputs = torch.cat([torch.full_like(flat[:, :1], IDS["sos_idx"]), flat[:, :-1]], 1)
    with torch.no_grad():
        logp = F.log_softmax(model.decode(inputs, memory.float().repeat_interleave(n, 0)), -1)
    lp = logp.gather(-1, flat[..., None])[..., 0]
    mask = torch.arange(L)[None] < lengths.flatten()[:, None]
    return ((lp * mask).sum(-1) / (lengths.flatten() + 1).float()).view(B, n)


def test_bf16_beam_search_and_sampling_are_fp32_to_bf16_precision():
    """Cached beam search under bf16 autocast finds captions whose fp32 score is the fp32 search's best to within
    bf16's rounding (the same captions where fp32's margin exceeds it); sampled captions' log-probs are the fp32
    teacher-forced ones to within that rounding."""
    model, _ = tiny_model(False, seed=5)
    model.eval()
    feats = torch.randn(6, 6, 24)
    with torch.no_grad():
        memory = model.encode(features=feats)
        fp32 = beam_search(model, memory, None, beam_size=3, max_len=8, **IDS)
        with autocast(CPU, "bf16"):
            memory_bf16 = model.encode(features=feats)
            bf16 = beam_search(model, memory_bf16, None, beam_size=3, max_len=8, **IDS)
            drawn = sample(model, memory_bf16, None, num_samples=3, max_len=8,
                           generator=torch.Generator().manual_seed(0), **IDS)
    assert memory_bf16.dtype == torch.bfloat16
    rescored = _scores_in_fp32(model, memory, bf16.tokens, bf16.lengths)
    assert (rescored >= fp32.scores - 0.03).all(), (rescored, fp32.scores)
    assert (bf16.tokens == fp32.tokens).all(-1).float().mean() >= 0.5  # most captions are the fp32 ones outright
    torch.testing.assert_close(bf16.scores, fp32.scores, rtol=0, atol=0.05)
    # sampling: the tokens drawn under bf16, scored by the fp32 model
    flat = drawn.tokens.flatten(0, 1)
    inputs = torch.cat([torch.full_like(flat[:, :1], IDS["sos_idx"]), flat[:, :-1]], 1)
    with torch.no_grad():
        logp = F.log_softmax(model.decode(inputs, memory.repeat_interleave(3, 0)), -1).gather(-1, flat[..., None])
    mask = torch.arange(flat.shape[1])[None] < drawn.lengths.flatten()[:, None]
    torch.testing.assert_close(drawn.logprobs.flatten(0, 1), logp[..., 0] * mask, rtol=0, atol=0.05)


def test_compiled_decoding_compiles_once_per_shape_not_per_step(dynamo):
    """A compiled beam search compiles its step once: the same graph serves every position, the next batch of that
    shape, and sampling of as many rows. The captions are the eager ones, the log-probs the eager ones to float
    rounding."""
    counter = GraphCounter()
    model, _ = tiny_model(False, seed=2)
    model.eval()
    with torch.no_grad():
        model.vocab_linear.bias[IDS["eos_idx"]] = -1e4  # every caption runs to max_len: 9 steps per search
    kw = dict(IDS, beam_size=3, max_len=9, num_outputs=3)
    with torch.inference_mode():
        memory = model.encode(features=torch.randn(4, 6, 24))
        eager = beam_search(model, memory, None, **kw)
        first = beam_search(model, memory, None, compile=counter, **kw)
        assert counter.graphs == 1 and first.tokens.shape[-1] == 9
        assert torch.equal(first.tokens, eager.tokens)
        torch.testing.assert_close(first.logprobs, eager.logprobs, rtol=0, atol=1e-5)
        again = beam_search(model, model.encode(features=torch.randn(4, 6, 24)), None, compile=counter, **kw)
        assert again.tokens.shape[-1] == 9
        drawn = sample(model, memory, None, num_samples=3, max_len=9, compile=counter,
                       generator=torch.Generator().manual_seed(0), **IDS)
        eager_drawn = sample(model, memory, None, num_samples=3, max_len=9,
                             generator=torch.Generator().manual_seed(0), **IDS)
    assert torch.equal(drawn.tokens, eager_drawn.tokens)
    assert counter.graphs == 1  # 27 steps of two searches and a sampling, one graph
    assert not graph_breaks()


@pytest.mark.slow
def test_compiled_decoding_of_new_batch_sizes_compiles_one_dynamic_graph(dynamo):
    """Batches of other sizes (a server's micro-batches): the second size compiles a graph with a dynamic batch
    size, which every later size reuses; greedy search (one row per image) adds one graph for all its sizes."""
    counter = GraphCounter()
    model, _ = tiny_model(False, seed=2)
    model.eval()
    with torch.inference_mode():
        for batch in (4, 3, 5, 7):
            memory = model.encode(features=torch.randn(batch, 6, 24))
            ours = beam_search(model, memory, None, beam_size=3, max_len=7, compile=counter, **IDS)
            assert torch.equal(ours.tokens, beam_search(model, memory, None, beam_size=3, max_len=7, **IDS).tokens)
        assert counter.graphs == 2
        for batch in (4, 6):  # one hypothesis per image: rows = images, a case of its own for the dynamic sizes
            memory = model.encode(features=torch.randn(batch, 6, 24))
            greedy = greedy_search(model, memory, None, max_len=7, compile=counter, **IDS)
            assert torch.equal(greedy.tokens, greedy_search(model, memory, None, max_len=7, **IDS).tokens)
    assert counter.graphs == 3
    assert not graph_breaks()


@pytest.mark.slow
def test_compiled_bf16_decoding_through_the_captioner(tiny_checkpoint, dynamo):
    """Captioner(compile=..., precision bf16): the encoder (backbone included) and the cached step compiled under
    bf16 autocast give the eager bf16 captions, beam and sampling; one graph each, reused by the next batch."""
    from captioner import load_captioner

    counter = GraphCounter()
    compiled = load_captioner(tiny_checkpoint, precision="bf16", compile=counter)
    eager = load_captioner(tiny_checkpoint, precision="bf16")
    assert compiled.backend == "torch" and compiled.runtime.info()["compile"]
    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for method in ("beam", "sample"):
        kw = dict(beam_size=2, max_len=6, num_captions=2, method=method)
        ours = compiled.caption(images, generator=torch.Generator().manual_seed(0), **kw)
        theirs = eager.caption(images, generator=torch.Generator().manual_seed(0), **kw)
        assert [[c.tokens for c in caps] for caps in ours] == [[c.tokens for c in caps] for caps in theirs]
        for a, b in zip(ours, theirs):
            assert [c.score for c in a] == pytest.approx([c.score for c in b], abs=0.02)
    graphs = counter.graphs
    assert graphs <= 3  # encoder, step of 3 x 2 rows (beam and sampling share it)
    compiled.caption(images[::-1], beam_size=2, max_len=6)
    assert counter.graphs == graphs
    assert not graph_breaks()
    with pytest.raises(ValueError, match="PyTorch backend"):
        load_captioner(tiny_checkpoint, backend="onnx", compile=True)


# ------------------------------------------------------------------------------------------- features and the API
def test_data_generator_under_bf16_writes_the_fp32_features_to_bf16_precision(tmp_path):
    captions, backbone = make_tiny_dataset(tmp_path, num_train=8)
    files = {}
    for precision in ("fp32", "bf16"):
        files[precision] = data_generator.main(data_generator.parse_config([
            "--save_model_path", str(backbone), "--output_path", str(tmp_path / f"{precision}.hdf5"),
            "--images_path", str(captions.parent), "--captions_path", str(captions), "--num_workers", "0",
            "--batch_size", "8", "--precision", precision, "--device", "cpu"]))
    with h5py.File(files["fp32"], "r") as a, h5py.File(files["bf16"], "r") as b:
        names = [k for k in a if isinstance(a[k], h5py.Dataset) and a[k].ndim == 3]
        assert names
        x, y = a[names[0]][()].astype(np.float32), b[names[0]][()].astype(np.float32)
    assert x.shape == y.shape and np.isfinite(y).all()
    assert np.abs(x - y).max() <= 0.05 * np.abs(x).max()


def test_api_backend_with_bf16_captions_on_pytorch(tiny_checkpoint):
    """CAPTION_PRECISION=bf16: the default backend is then PyTorch (ONNX Runtime serves fp32 only), /ready says bf16
    and /predict answers."""
    import api
    from serving.testing import image_bytes, ready_client

    app = api.build_app(environ={"CAPTION_CHECKPOINT": str(tiny_checkpoint), "CAPTION_PRECISION": "bf16",
                                 "CAPTION_MAX_WAIT_MS": "1"})
    with ready_client(app) as client:
        ready = client.get("/ready").json()
        assert ready["model"]["precision"] == "bf16" and ready["model"]["kind"] == "torch", ready
        answer = client.post("/predict?beam_size=2&max_len=6", files={"file": ("a.png", image_bytes(), "image/png")})
        assert answer.status_code == 200, answer.text
        assert isinstance(answer.json()["caption"], str) and np.isfinite(answer.json()["score"])


# ----------------------------------------------------------------------------------- CUDA's autocast on fake tensors
@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype) -> Iterator[None]:
    """CUDA's autocast switched on directly: torch.autocast('cuda') refuses without a GPU, but the dispatcher
    applies CUDA's policy (bf16 matrix products, fp32 layer norms, sums and softmaxes) to fake CUDA tensors."""
    enabled, previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", previous)


def fake_cuda_model(end_to_end: bool):
    """The tiny model with fake CUDA parameters (shapes, dtypes and devices only; no data, no GPU)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mode = FakeTensorMode()
    cuda = torch.device("cuda")
    model, cfg = tiny_model(end_to_end)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                fake = FakeTensor(mode, torch.empty_like(p, device="meta"), cuda)
                module._parameters[name] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = FakeTensor(mode, torch.empty_like(b, device="meta"), cuda)
    return model, cfg, mode


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU, the gpu tests run these paths for real")
@pytest.mark.parametrize("end_to_end", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_and_device_placement_on_fake_cuda_tensors(end_to_end, dtype):
    """Under CUDA's autocast policy, on (fake) CUDA tensors: the teacher-forced pass and its loss, the cached steps
    with both cache kinds and their beam re-ordering, and one step of beam search and sampling create nothing on
    the CPU (a fake tensor refuses to meet a CPU one); the caches hold autocast's dtype, not fp32 copies that every
    step would convert again."""
    try:
        model, cfg, mode = fake_cuda_model(end_to_end)
    except Exception as e:  # noqa: BLE001 - this torch cannot fake CUDA tensors: nothing to check here
        pytest.skip(f"fake CUDA tensors unavailable: {type(e).__name__}: {e}")
    from torch._subclasses.fake_tensor import DataDependentOutputException

    from losses import LabelSmoothingLoss
    from models.decoding import TorchStepper

    cuda = torch.device("cuda")
    with mode:
        visual = torch.randn(2, 3, 32, 32, device=cuda) if end_to_end else torch.randn(2, 6, 24, device=cuda)
        inputs = {"images" if end_to_end else "features": visual}
        tokens = torch.randint(3, cfg.vocab_size, (4, 7), device=cuda)
        with cuda_autocast(dtype):
            logits = model(tokens[:, :-1], caption_index=torch.arange(2, device=cuda).repeat_interleave(2), **inputs)
        loss, count = LabelSmoothingLoss(cfg.vocab_size, 0)(logits, tokens[:, 1:])
        assert logits.device.type == "cuda" and loss.device.type == "cuda"
        model.eval()
        with torch.no_grad(), cuda_autocast(dtype):
            memory = model.encode(**inputs)
            for fixed in (False, True):
                stepper = TorchStepper(model, memory, None, 3, 5, compile=False)
                if fixed:
                    stepper.cache = model.init_cache(memory, None, 3, 5, fixed=True)
                assert {c.k.dtype for c in stepper.cache.cross} == {dtype}
                prefix = torch.full((6, 1), IDS["sos_idx"], device=cuda)
                for _ in range(4):
                    logp = stepper.logprobs(prefix)
                    stepper.reorder(torch.arange(6, device=cuda).flip(0))
                    prefix = torch.cat([prefix, logp.argmax(-1, keepdim=True)], 1)
                assert {b.dtype for c in stepper.cache.dyn for b in c.tensors.values()} == {dtype}
                assert logp.dtype == torch.float32 and logp.device.type == "cuda"
            for search in (functools.partial(beam_search, beam_size=3), functools.partial(sample, num_samples=3)):
                with pytest.raises(DataDependentOutputException):  # the "all finished?" check after the first step
                    search(model, memory, None, max_len=5, **IDS)


# -------------------------------------------------------------------------------------------------- on a real GPU
@gpu
@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_gpu_train_step_bf16_compiled_in_every_mode(tmp_path, dynamo, mode):
    """On CUDA, with inductor: each mode's step compiled under bf16, from pinned batches, with no graph break and
    no recompilation at the second step."""
    cuda = torch.device("cuda")
    e2e = mode.endswith("e2e")
    counter = GraphCounter("inductor")
    model, cfg = tiny_model(e2e, device=cuda)
    trainer = make_trainer(torch.compile(model, backend=counter), cfg, mode, "bf16", tmp_path, device=cuda)
    batch = caption_batch(trainer.vocab, e2e, 3).pin_memory()
    before = weights(model)
    with pytest.MonkeyPatch.context() as mp:  # SCST's extra compiled pieces take the same counting backend
        mp.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
        terms = one_step(trainer, batch)
        graphs = counter.graphs
        one_step(trainer, batch, seed=1)
    step_checks(before, model, terms, mode)
    assert counter.graphs == graphs and not graph_breaks()


@gpu
@needs_cuda
def test_gpu_decoding_bf16_compiled_equals_eager_and_compiles_once(dynamo):
    cuda = torch.device("cuda")
    model, _ = tiny_model(False, seed=2, device=cuda)
    model.eval()
    with torch.no_grad():
        model.vocab_linear.bias[IDS["eos_idx"]] = -1e4
    counter = GraphCounter("inductor")
    kw = dict(IDS, beam_size=3, max_len=9, num_outputs=3)
    with torch.inference_mode():
        feats = torch.randn(8, 6, 24, device=cuda)
        fp32_memory = model.encode(features=feats)
        fp32 = beam_search(model, fp32_memory, None, **kw)
        compiled_fp32 = beam_search(model, fp32_memory, None, compile=counter, **kw)
        torch.testing.assert_close(compiled_fp32.scores, fp32.scores, rtol=0, atol=1e-4)
        with autocast(cuda, "bf16"):
            memory = model.encode(features=feats)
            eager = beam_search(model, memory, None, **kw)
            graphs = counter.graphs
            ours = beam_search(model, memory, None, compile=counter, **kw)
            assert counter.graphs == graphs + 1  # one graph for the nine steps under bf16
            beam_search(model, memory, None, compile=counter, **kw)
            assert counter.graphs == graphs + 1
    torch.testing.assert_close(ours.scores, eager.scores, rtol=0, atol=0.02)
    rescored = _scores_in_fp32(model, fp32_memory, ours.tokens, ours.lengths)
    assert (rescored >= fp32.scores - 0.03).all()
    assert not graph_breaks()


@gpu
@needs_cuda
def test_gpu_data_generator_bf16_from_pinned_batches(tmp_path):
    captions, backbone = make_tiny_dataset(tmp_path, num_train=8)
    out = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "bf16")):
        out[device] = data_generator.main(data_generator.parse_config([
            "--save_model_path", str(backbone), "--output_path", str(tmp_path / f"{device}.hdf5"),
            "--images_path", str(captions.parent), "--captions_path", str(captions), "--num_workers", "1",
            "--batch_size", "8", "--precision", precision, "--device", device]))
    with h5py.File(out["cpu"], "r") as a, h5py.File(out["cuda"], "r") as b:
        name = next(k for k in a if isinstance(a[k], h5py.Dataset) and a[k].ndim == 3)
        x, y = a[name][()].astype(np.float32), b[name][()].astype(np.float32)
    assert np.abs(x - y).max() <= 0.05 * np.abs(x).max()


@gpu
@needs_cuda
def test_gpu_api_backend_bf16(tiny_checkpoint):
    from PIL import Image

    import api

    backend = api.load_backend({"CHECKPOINT": str(tiny_checkpoint), "DEVICE": "cuda", "PRECISION": "bf16",
                                "BACKEND": "auto"})
    info = backend.info()
    assert info["device"].startswith("cuda") and info["precision"] == "bf16" and info["kind"] == "torch"
    from serving.backend import CaptionParams

    images = [backend.prepare(Image.new("RGB", (40, 30), (i * 60, 20, 200))) for i in range(3)]
    out = backend.caption_batch(images, CaptionParams(beam_size=2, max_len=6, num_captions=2))
    assert len(out) == 3 and all(len(c) == 2 and np.isfinite(c[0][1]) for c in out)


@gpu
@needs_cuda
def test_gpu_pinned_loader_batches_reach_the_device(tmp_path):
    from data.loaders import CaptionDataset, EpochBatchSampler, ImageSource, make_loader

    captions, backbone = make_tiny_dataset(tmp_path, num_train=8)
    from data.formats import load_records
    from models import tiny_swinv2

    records = [r for r in load_records(captions, captions.parent) if r.split == "train"]
    source = ImageSource(backbone=tiny_swinv2(img_size=32, embed_dim=16, depths=(1, 1), window_size=4))
    dataset = CaptionDataset(records, tiny_vocab(), source, mode="image")
    loader = make_loader(dataset, EpochBatchSampler(len(dataset), 4, 0, 0, 1), num_workers=1, pin_memory=True)
    batch = next(iter(loader))
    assert batch.images.is_pinned() and batch.tokens.is_pinned()
    on_gpu = batch.to(torch.device("cuda"))
    assert on_gpu.images.is_cuda and on_gpu.caption_index.is_cuda


def test_module_compiled_functions_are_shared_per_backend():
    a = decoding_module.compiled("step", "aot_eager")
    assert decoding_module.compiled("step", "aot_eager") is a
    assert decoding_module.compiled("encode", "aot_eager") is not a


def test_compile_option_reaches_the_pytorch_runtime_from_scripts_and_api(tiny_checkpoint, tmp_path):
    """--compile True in test.py and demo.py, CAPTION_COMPILE in the API: a compiled PyTorch runtime (backend auto
    means PyTorch then); ONNX Runtime with compile, or a CAPTION_COMPILE that is not a boolean, is a clear error."""
    import api
    import demo
    import test as test_script
    from deploy.loading import load_model
    from serving.settings import SettingsError

    assert demo.parse_config(["--checkpoint", str(tiny_checkpoint), "--image_paths", str(tmp_path), "--compile",
                              "True"]).compile
    assert test_script.parse_config(["--checkpoint", str(tiny_checkpoint), "--images_path", str(tmp_path),
                                   "--compile", "True"]).compile
    loaded = load_model(tiny_checkpoint, compile="aot_eager")
    assert loaded.runtime.kind == "torch" and loaded.runtime.info()["compile"] == "aot_eager"
    default = load_model(tiny_checkpoint).runtime  # backend auto: PyTorch for a checkpoint, uncompiled
    assert default.kind == "torch" and "compile" not in default.info()
    with pytest.raises(ValueError, match="PyTorch backend"):
        load_model(tiny_checkpoint, backend="onnx", compile=True)
    with pytest.raises(SettingsError, match="CAPTION_COMPILE"):
        api.ExpansionNetBackend.load({"CHECKPOINT": str(tiny_checkpoint), "COMPILE": "maybe"})
