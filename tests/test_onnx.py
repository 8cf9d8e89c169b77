"""ONNX export and the ONNX Runtime backend: the same captions as PyTorch, from the same search code."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time

import onnx
import pytest
import torch
from conftest import tiny_config, tiny_vocab
from numerics import SEED_MODEL_ROUNDINGS, TINY_E2E_ROUNDINGS, assert_close_f32

from captioner import load_captioner
from deploy.checkpoints import save_model_checkpoint
from deploy.loading import prune_onnx_cache
from deploy.onnx_export import export_onnx
from deploy.runtime import OrtRuntime, TorchRuntime
from export import ExportConfig
from export import main as export_main
from models import build_model, optimizer_expansionnet_config
from models.decoding import beam_search, greedy_search, sample

IDS = {"sos_idx": 1, "eos_idx": 2, "pad_idx": 0}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny end-to-end seed-model checkpoint and its ONNX export through export.py (checked, run once)."""
    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    cfg = tiny_config()
    ckpt = save_model_checkpoint(root / "tiny.pth", build_model(cfg), cfg, tiny_vocab())
    folder = export_main(ExportConfig(checkpoint=(str(ckpt),), output_path=str(root / "exp")))
    return ckpt, folder


def _runtimes(exported):
    ckpt, folder = exported
    torch_cap = load_captioner(ckpt)
    return torch_cap.runtime, OrtRuntime(folder)


def _vocab(size: int):
    from data.vocab import Vocabulary

    return Vocabulary(["PAD", "SOS", "EOS", "UNK"] + [f"w{i}" for i in range(size - 4)])


def _assert_same_steps(torch_rt, ort_rt, inputs, steps, roundings):
    """Step log-probs of both runtimes along the same greedy path, with a beam re-ordering between steps, equal up to
    ``roundings`` float32 roundings (ONNX Runtime's kernels sum in other orders than PyTorch's)."""
    group = 2
    with torch.no_grad():
        a_step = torch_rt.stepper(torch_rt.encode(**inputs), None, group, steps)
    b_step = ort_rt.stepper(ort_rt.encode(**inputs), None, group, steps)
    rows = a_step.batch * group
    prefix = torch.full((rows, 1), IDS["sos_idx"], dtype=torch.long)
    for _ in range(steps):
        with torch.no_grad():
            a = a_step.logprobs(prefix)
        b = b_step.logprobs(prefix)
        assert_close_f32(b, a, roundings=roundings)
        index = torch.arange(rows).view(-1, group).flip(1).reshape(-1)
        a_step.reorder(index)
        b_step.reorder(index)
        prefix = torch.cat([prefix.index_select(0, index), a.argmax(-1, keepdim=True)], dim=1)


def test_onnx_fp32_gives_pytorch_tokens_on_every_image_and_step_logprobs_up_to_rounding(exported):
    torch_rt, ort_rt = _runtimes(exported)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _assert_same_steps(torch_rt, ort_rt, {"images": images[:3]}, steps=6, roundings=TINY_E2E_ROUNDINGS)
    with torch.no_grad():
        mem_t = torch_rt.encode(images=images)
    mem_o = ort_rt.encode(images=images)
    kw = dict(IDS, max_len=12)
    for search, extra in ((beam_search, {"beam_size": 4, "num_outputs": 4}), (greedy_search, {})):
        with torch.no_grad():
            a = search(torch_rt, mem_t, None, **kw, **extra)
        b = search(ort_rt, mem_o, None, **kw, **extra)
        assert torch.equal(a.tokens, b.tokens), search.__name__
        # other kernels: a tiny end-to-end captioner's rounding per log-prob, <= 12 of them in a score
        assert_close_f32(b.logprobs, a.logprobs, roundings=TINY_E2E_ROUNDINGS)
        assert_close_f32(b.scores, a.scores, roundings=12 * TINY_E2E_ROUNDINGS, scale=a.logprobs)
    with torch.no_grad():
        a = sample(torch_rt, mem_t, None, num_samples=3, generator=torch.Generator().manual_seed(0), **kw)
    b = sample(ort_rt, mem_o, None, num_samples=3, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a.tokens, b.tokens)


def test_encoder_graph_has_a_dynamic_batch_and_the_step_graph_caches_as_inputs_and_outputs(exported):
    _, ort_rt = _runtimes(exported)
    enc = onnx.load(exported[1] / "encoder.onnx")
    assert enc.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    step = onnx.load(exported[1] / "decoder_step.onnx")
    inputs = [i.name for i in step.graph.input]
    outputs = [o.name for o in step.graph.output]
    assert inputs[:3] == ["tokens", "position", "beam_index"]
    for layer in range(2):
        assert {f"cross_k.{layer}", f"cross_v.{layer}"} <= set(inputs)
        for name in ("k", "va", "vb", "cond", "ca", "cb"):
            assert f"past.{layer}.{name}" in inputs and f"present.{layer}.{name}" in outputs
    assert outputs[0] == "logprobs"
    for batch in (1, 5):  # any batch size through both graphs
        memory = ort_rt.encode(images=torch.randn(batch, 3, 32, 32))
        out = beam_search(ort_rt, memory, None, beam_size=3, max_len=4, **IDS)
        assert out.tokens.shape[:2] == (batch, 1)


def test_captioner_loads_an_exported_folder_and_captions_like_the_checkpoint(exported):
    tiny_checkpoint, folder = exported
    manifest = json.loads((folder / "config.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["opset"] == 17
    torch_cap, onnx_cap = load_captioner(tiny_checkpoint), load_captioner(folder)
    assert onnx_cap.backend == "onnx" and onnx_cap.max_seq_len == torch_cap.max_seq_len
    images = [torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for method, kw in (("beam", {"beam_size": 3, "num_captions": 2}), ("greedy", {})):
        a = torch_cap.caption(images, max_len=8, method=method, **kw)
        b = onnx_cap.caption(images, max_len=8, method=method, **kw)
        assert [[c.tokens for c in caps] for caps in a] == [[c.tokens for c in caps] for caps in b]
    captions = ["a red circle", "two blue squares"]
    want = torch_cap.logprobs(images[:2], captions)  # teacher-forced log-probs, other kernels
    assert_close_f32(onnx_cap.logprobs(images[:2], captions), want, roundings=TINY_E2E_ROUNDINGS)
    with pytest.raises(ValueError, match="no PyTorch weights"):
        load_captioner(folder, backend="torch")


def test_official_checkpoint_exports_with_its_vocabulary(tmp_path):
    tokens = list(tiny_vocab().tokens)
    cfg = tiny_config("expansionnet_v2", end_to_end=False, num_exp_enc_list=(32, 64, 128, 256, 512))
    torch.manual_seed(3)
    model = build_model(cfg)
    official = tmp_path / "rf_model.pth"
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": {}}, official)
    vocab = tmp_path / "demo_coco_tokens.pickle"
    vocab.write_bytes(pickle.dumps({"word2idx_dict": {w: i for i, w in enumerate(tokens)}, "idx2word_list": tokens,
                                    "sos_str": "SOS", "eos_str": "EOS"}))
    with pytest.raises(ValueError, match="--vocab"):
        export_main(ExportConfig(checkpoint=(str(official),), output_path=str(tmp_path / "x")))
    folder = export_main(ExportConfig(checkpoint=(str(official),), vocab=str(vocab), output_path=str(tmp_path / "off")))
    onnx_cap = load_captioner(folder)
    assert list(onnx_cap.vocab.tokens) == tokens and onnx_cap.config.name == "expansionnet_v2"
    feats = torch.randn(3, 7, 24)
    a = load_captioner(official, vocab=vocab).caption_features(feats, beam_size=3, max_len=9)
    b = onnx_cap.caption_features(feats, beam_size=3, max_len=9)
    assert [c[0].tokens for c in a] == [c[0].tokens for c in b]


def test_fp16_export_runs_and_stays_close_to_fp32(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(end_to_end=False)
    model = build_model(cfg).eval()
    result = export_onnx(model, cfg, tiny_vocab(), tmp_path / "fp16", precision="fp16")
    assert result.max_abs_logprob_diff < 0.05
    rt = OrtRuntime(tmp_path / "fp16")
    assert rt.precision == "fp16"
    out = beam_search(rt, rt.encode(features=torch.randn(2, 6, 24)), None, beam_size=2, max_len=5, **IDS)
    assert torch.isfinite(out.scores).all()
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left in fp32


def test_checkpoint_with_backend_onnx_is_exported_once_into_the_cache(exported, tmp_path):
    tiny_checkpoint = exported[0]
    cap = load_captioner(tiny_checkpoint, backend="onnx", onnx_cache=tmp_path)
    assert cap.backend == "onnx"
    (folder,) = tmp_path.iterdir()
    stamp = (folder / "decoder_step.onnx").stat().st_mtime_ns
    assert load_captioner(tiny_checkpoint, backend="onnx", onnx_cache=tmp_path).runtime.folder == folder
    assert (folder / "decoder_step.onnx").stat().st_mtime_ns == stamp  # reused, not exported again
    image = torch.randn(3, 32, 32)
    assert cap.caption([image], beam_size=2, max_len=5)[0][0].tokens == \
        load_captioner(tiny_checkpoint).caption([image], beam_size=2, max_len=5)[0][0].tokens


@pytest.mark.slow
def test_real_size_seed_model_onnx_matches_pytorch(tmp_path):
    """The seed model's captioner at full size (2 + 2 layers, 512 wide, 40 memory slots, 10,000 words), random
    weights, on 144 x 1024 backbone features: the same tokens, and step log-probs equal up to rounding."""
    cfg = optimizer_expansionnet_config(end_to_end=False)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    export_onnx(model, cfg, _vocab(cfg.vocab_size), tmp_path / "onnx", verify=False)  # compared below instead
    torch_rt, ort_rt = TorchRuntime(model, cfg, torch.device("cpu"), "fp32"), OrtRuntime(tmp_path / "onnx")
    feats = torch.randn(2, 144, 1024, generator=torch.Generator().manual_seed(2))
    _assert_same_steps(torch_rt, ort_rt, {"features": feats[:1]}, steps=3, roundings=SEED_MODEL_ROUNDINGS)
    with torch.no_grad():
        a = beam_search(torch_rt, torch_rt.encode(features=feats), None, beam_size=3, max_len=5, **IDS)
    b = beam_search(ort_rt, ort_rt.encode(features=feats), None, beam_size=3, max_len=5, **IDS)
    assert torch.equal(a.tokens, b.tokens)
    assert_close_f32(b.logprobs, a.logprobs, roundings=SEED_MODEL_ROUNDINGS)  # the full-size model, other kernels


def _fake_export(cache, name, age_s):
    """A finished export's folder (config.json and 1 MB of graph) last used age_s seconds ago."""
    folder = cache / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "encoder.onnx").write_bytes(bytes(1 << 20))
    stamp = time.time() - age_s
    os.utime(folder, (stamp, stamp))
    return folder


def _ended_pid():
    """The id of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_onnx_cache_keeps_the_most_recently_used_exports_and_names_what_it_removes(tmp_path, capsys):
    cache = tmp_path / "cache"
    exports = [_fake_export(cache, f"{i:016x}-fp32", age_s=100 * i) for i in range(1, 6)]  # [0] most recent
    dead = cache / f"{7:016x}-fp32.tmp-{_ended_pid()}"
    live = cache / f"{8:016x}-fp16.tmp-{os.getpid()}"  # an export this process is making
    for folder in (dead, live, cache / "notes"):
        folder.mkdir()
    (cache / "readme.txt").write_text("mine")
    removed = prune_onnx_cache(cache, keep=3)
    assert set(removed) == {exports[3], exports[4], dead}
    assert sorted(p.name for p in cache.iterdir()) == sorted([*(e.name for e in exports[:3]), live.name, "notes",
                                                              "readme.txt"])
    err = capsys.readouterr().err
    assert err.count("keeps the 3 most recently used exports") == 2 and str(exports[4]) in err and "1.0 MB" in err
    assert f"{dead} " in err and "unfinished" in err
    assert prune_onnx_cache(tmp_path / "absent") == []


def test_loading_through_the_cache_marks_its_export_as_the_most_recent_and_prunes_the_rest(tmp_path, capsys):
    torch.manual_seed(3)
    cfg = tiny_config()
    ckpt = save_model_checkpoint(tmp_path / "tiny.pth", build_model(cfg), cfg, tiny_vocab())
    cache = tmp_path / "cache"
    older = [_fake_export(cache, f"{i:016x}-fp32", age_s=100 * i) for i in range(1, 4)]
    first = load_captioner(ckpt, backend="onnx", onnx_cache=cache).runtime.folder
    assert sorted(cache.iterdir()) == sorted([first, *older[:2]])  # the new export and the two most recent others
    err = capsys.readouterr().err
    assert f"removed the ONNX export {older[2]}" in err
    assert "exporting" in err and "tracing the encoder and decoder-step graphs" in err and "checking the graphs" in err
    os.utime(first, (0, 0))  # as if last used in 1970
    os.utime(older[0], (1, 1))
    load_captioner(ckpt, backend="onnx", onnx_cache=cache)  # reused (not exported again), so the most recent now
    assert "exporting" not in capsys.readouterr().err
    _fake_export(cache, f"{9:016x}-fp32", age_s=1)
    load_captioner(ckpt, backend="onnx", onnx_cache=cache)
    assert sorted(cache.iterdir()) == sorted([first, older[1], cache / f"{9:016x}-fp32"])  # older[0]: the oldest
