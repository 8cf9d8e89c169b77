"""Checkpoints and the Python API: round trips, foreign files refused clearly, every image mode, demo.py."""

from __future__ import annotations

import argparse
import inspect
import json
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_config, tiny_vocab
from numerics import TINY_E2E_ROUNDINGS, assert_close_f32
from PIL import Image
from processes import run_watched

import demo
from captioner import Caption, Captioner, load_captioner
from data.images import ImageLoadError
from deploy.checkpoints import read_backbone_file, restore_model, save_backbone_file, save_model_checkpoint
from models import build_model
from models.backbone import create_backbone, load_backbone_state_dict
from models.cpu_packing import PackedLinear
from utils.checkpoint import CheckpointError, load_checkpoint_file
from utils.cli import CheckpointOptions, LengthOptions, resolve_max_len
from utils.runtime import RuntimeOptions, resolve_device, resolve_precision

PHOTO = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"


def test_checkpoint_round_trip_gives_identical_captions_and_weights(tiny_checkpoint, tmp_path):
    a = load_captioner(tiny_checkpoint, backend="torch")
    ckpt = load_checkpoint_file(tiny_checkpoint)
    assert ckpt["format_version"] == 1 and ckpt["vocab"]["tokens"] == list(tiny_vocab().tokens)
    again = save_model_checkpoint(tmp_path / "again.pth", a.model, a.config, a.vocab)
    b = load_captioner(again, backend="torch")
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    img = Image.open(PHOTO)
    assert a.caption([img], beam_size=3, max_len=8) == b.caption([img], beam_size=3, max_len=8)


def test_checkpoint_with_pickled_python_objects_is_refused(tmp_path):
    bad = tmp_path / "namespace.pth"
    torch.save({"model_state_dict": {}, "args": argparse.Namespace(lr=1)}, bad)
    with pytest.raises(CheckpointError, match="beyond tensors and plain data"):
        load_checkpoint_file(bad)


def test_truncated_or_missing_checkpoint_error_names_the_file(tmp_path, tiny_checkpoint):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(tiny_checkpoint.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.pth"):
        load_checkpoint_file(cut)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_file(tmp_path / "nope.pth")


def _official_like(tmp_path: Path, vocab_tokens: list[str], vocab_size: int) -> tuple[Path, Path]:
    """A checkpoint laid out like the official release (no config, no vocabulary) and its vocabulary pickle."""
    cfg = tiny_config("expansionnet_v2", end_to_end=False, vocab_size=vocab_size, num_exp_enc_list=(32, 64, 128, 256,
                                                                                                     512))
    model = build_model(cfg)
    path = tmp_path / "official.pth"
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": {}}, path)
    vocab = tmp_path / "demo_coco_tokens.pickle"
    with open(vocab, "wb") as f:
        pickle.dump({"word2idx_dict": {w: i for i, w in enumerate(vocab_tokens)}, "idx2word_list": vocab_tokens,
                     "sos_str": "SOS", "eos_str": "EOS"}, f)
    return path, vocab


def test_official_layout_checkpoint_loads_with_its_vocabulary_pickle(tmp_path):
    tokens = list(tiny_vocab().tokens)
    path, vocab = _official_like(tmp_path, tokens, len(tokens))
    restored = restore_model(path, vocab_path=vocab)
    assert restored.official and restored.config.name == "expansionnet_v2" and len(restored.vocab) == len(tokens)
    with pytest.raises(CheckpointError, match="--vocab"):
        restore_model(path)


def test_foreign_checkpoint_with_wrong_vocabulary_size_is_refused_clearly(tmp_path):
    tokens = list(tiny_vocab().tokens)
    path, vocab = _official_like(tmp_path, tokens, len(tokens) + 7)
    with pytest.raises(CheckpointError, match=rf"vocabulary has {len(tokens)} tokens .* {len(tokens) + 7} outputs"):
        restore_model(path, vocab_path=vocab)


def test_weights_for_another_backbone_are_refused_with_what_differs(tiny_checkpoint):
    cfg, state = read_backbone_file(tiny_checkpoint)
    wider = replace(cfg, overrides={**cfg.overrides, "embed_dim": 24})
    with pytest.raises(ValueError, match=r"shape mismatches.*patch_embed"):
        load_backbone_state_dict(create_backbone(wider), state, "tiny.pth")


def test_backbone_files_in_microsoft_layout_and_ours_load_the_same_weights(tmp_path):
    cfg = tiny_config().backbone
    torch.manual_seed(0)
    src = create_backbone(cfg)
    state = src.state_dict()
    # Microsoft's layout: downsample at the end of the previous stage, classifier head, non-learned buffers
    ms = {}
    for k, v in state.items():
        if k.startswith("layers.1.downsample"):
            k = k.replace("layers.1.downsample", "layers.0.downsample")
        ms[k] = v
    ms["head.weight"], ms["head.bias"] = torch.zeros(10, 32), torch.zeros(10)
    ms["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    dst = create_backbone(cfg)
    load_backbone_state_dict(dst, {"model": ms}["model"], "ms.pth")
    for k, v in state.items():
        assert torch.equal(dst.state_dict()[k], v), k
    ours = save_backbone_file(tmp_path / "bb.pth", src, cfg)
    cfg2, state2 = read_backbone_file(ours)
    assert cfg2 == cfg and all(torch.equal(state2[k], v) for k, v in state.items())


def _photo_folder(tmp_path: Path) -> Path:
    """Real photographs in mixed sizes and modes, the way users' folders look."""
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = Image.open(PHOTO).convert("RGB")
    photo.save(folder / "hopper.jpg")
    photo.resize((123, 301)).convert("L").save(folder / "gray.png")
    rgba = photo.resize((640, 200)).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "alpha.png")
    photo.resize((90, 90)).convert("CMYK").save(folder / "cmyk.jpg")
    photo.resize((77, 55)).convert("P").save(folder / "palette.gif")
    deep = (np.asarray(photo.convert("L").resize((64, 48)), dtype=np.uint16) * 257)
    Image.fromarray(deep).save(folder / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.resize((200, 100)).save(folder / "rotated.jpg", exif=exif)
    return folder


def test_caption_accepts_paths_pil_bytes_and_tensors_with_scores(tiny_checkpoint, tmp_path):
    cap = load_captioner(tiny_checkpoint)
    folder = _photo_folder(tmp_path)
    files = sorted(folder.iterdir())
    tensor = cap.preprocess([files[0]])[0]
    images = [str(files[0]), Image.open(files[1]), files[2].read_bytes(), tensor, *files[3:]]
    out = cap.caption(images, beam_size=3, max_len=6, num_captions=2, batch_size=3)
    assert len(out) == len(images) and all(len(c) == 2 for c in out)
    assert all(c[0].score >= c[1].score for c in out)
    alone = cap.caption([files[0]], beam_size=3, max_len=6, num_captions=2)[0]
    for same in (alone, out[3]):  # batched = alone; the preprocessed tensor of the file = the file
        assert [c.text for c in same] == [c.text for c in out[0]]
        # other batch shapes may run other kernels: rounding of a tiny end-to-end captioner's log-probs (<= 6)
        assert_close_f32(torch.tensor([c.score for c in same]), torch.tensor([c.score for c in out[0]]),
                         roundings=6 * TINY_E2E_ROUNDINGS)


def test_caption_of_one_image_takes_a_str_path_bytes_pil_or_tensor_and_returns_its_captions(tiny_checkpoint,
                                                                                            tmp_path):
    cap = load_captioner(tiny_checkpoint)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(PHOTO.read_bytes())
    expected = [c.text for c in cap.caption([photo], beam_size=2, num_captions=2)[0]]
    tensor = cap.preprocess([photo])[0]
    for single in (str(photo), photo, photo.read_bytes(), Image.open(photo), tensor):
        captions = cap.caption(single, beam_size=2, num_captions=2)  # not one result per character of a str
        assert all(isinstance(c, Caption) for c in captions) and [c.text for c in captions] == expected, single
    assert [c.text for c in cap.caption((str(photo),), beam_size=2, num_captions=2)[0]] == expected  # a tuple: a list
    batch = cap.caption(tensor[None].expand(3, -1, -1, -1), beam_size=2)  # (B, 3, H, W): one list per image
    assert len(batch) == 3 and all(len(captions) == 1 for captions in batch)


def test_caption_default_length_cap_is_demos_the_models_full_length(tiny_checkpoint):
    cap = load_captioner(tiny_checkpoint)
    assert cap.max_caption_len == resolve_max_len(LengthOptions(), cap.max_seq_len - 1) == 23  # demo.py's cap
    default, full = cap.caption(PHOTO)[0], cap.caption(PHOTO, max_len=23)[0]
    assert default.tokens == full.tokens and len(default.tokens) > 20  # the random tiny model never stops early


def test_logprobs_are_teacher_forced_distributions(tiny_checkpoint):
    cap = load_captioner(tiny_checkpoint)
    lp = cap.logprobs([PHOTO, PHOTO], ["a red circle", "two blue squares and a triangle"])
    V = len(cap.vocab)
    assert lp.shape == (2, 7, V)
    assert_close_f32(lp[1].exp().sum(-1), torch.ones(7), roundings=2 * V)  # a log-softmax then a sum of V terms
    assert (lp[0, 4:] == 0).all()  # padding after "a red circle EOS"


def test_bad_image_error_names_the_file(tiny_checkpoint, tmp_path):
    cap = load_captioner(tiny_checkpoint)
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(ImageLoadError, match="notes.jpg"):
        cap.caption([bad])


def test_features_only_checkpoint_refuses_images_clearly(tmp_path):
    cfg = tiny_config(end_to_end=False)
    path = save_model_checkpoint(tmp_path / "f.pth", build_model(cfg), cfg, tiny_vocab())
    cap = load_captioner(path)
    with pytest.raises(ValueError, match="features-only"):
        cap.caption([PHOTO])
    assert len(cap.caption_features(torch.randn(2, 5, 24), beam_size=2, max_len=5)) == 2


@pytest.mark.slow
def test_demo_captions_a_folder_of_mixed_photos_and_draws_a_grid(tiny_checkpoint, tmp_path):
    folder = _photo_folder(tmp_path)
    (folder / "broken.jpg").write_bytes(PHOTO.read_bytes()[:2000])
    grid = tmp_path / "grid.png"
    proc = run_watched([sys.executable, "demo.py", "--load_path", str(tiny_checkpoint), "--image_paths",
                           str(folder), "--beam_size", "3", "--max_seq_len", "6", "--json", "--grid", str(grid)],
                          cwd=ROOT)
    assert proc.returncode == 1, proc.stderr  # one unreadable file: reported, the others captioned
    assert "broken.jpg" in proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 7 and all(r["captions"] and isinstance(r["captions"][0]["caption"], str) for r in rows)
    shown = Image.open(grid)
    assert shown.format == "PNG" and shown.width > 256


def test_bf16_autocast_on_the_cpu_captions_close_to_fp32(tiny_checkpoint):
    images = [torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    fp32 = load_captioner(tiny_checkpoint).caption(images, beam_size=2, max_len=6)
    bf16 = load_captioner(tiny_checkpoint, precision="bf16")
    assert bf16.precision == "bf16"
    out = bf16.caption(images, beam_size=2, max_len=6)
    assert len(out) == 2 and all(len(c[0].tokens) >= 1 for c in out)
    # bf16 keeps 8 significant bits (2^-8 relative per rounded operand): 0.1 on scores near 1 allows ~25 of them
    assert [c[0].score for c in out] == pytest.approx([c[0].score for c in fp32], abs=0.1)


def test_the_default_backend_is_pytorch_for_a_checkpoint_and_exports_nothing(tiny_checkpoint, tmp_path):
    """backend 'auto' never starts an export on its own: PyTorch for checkpoints (any precision), ONNX Runtime only for
    a folder that already is an export; every entry point's default is the one option field's."""
    import demo
    import test as test_script
    from deploy.loading import DEFAULT_BACKEND
    from utils.cli import CheckpointOptions

    cache = tmp_path / "cache"
    assert load_captioner(tiny_checkpoint, onnx_cache=cache).backend == "torch" and not cache.exists()
    assert load_captioner(tiny_checkpoint, precision="bf16", onnx_cache=cache).backend == "torch"
    folder = load_captioner(tiny_checkpoint, backend="onnx", onnx_cache=cache).runtime.folder
    assert load_captioner(folder).backend == "onnx"
    args = ["--checkpoint", str(tiny_checkpoint), "--image_paths", str(PHOTO)]
    assert DEFAULT_BACKEND == CheckpointOptions.backend == demo.parse_config(args).backend == "auto"
    assert test_script.parse_config(["--checkpoint", str(tiny_checkpoint), "--images_path", str(tmp_path)]
                                    ).backend == DEFAULT_BACKEND


def test_the_python_api_defaults_to_the_scripts_device_backend_and_precision(tiny_checkpoint):
    """load_captioner(path) decodes where and how demo.py does without flags: its defaults are the scripts' option
    fields (device auto: a GPU when there is one, not always the CPU; backend auto; precision auto; no compile)."""
    cfg = demo.parse_config(["--checkpoint", str(tiny_checkpoint), "--image_paths", str(PHOTO)])
    for fn in (load_captioner, Captioner.__init__):
        defaults = {k: v.default for k, v in inspect.signature(fn).parameters.items()}
        assert defaults["device"] == RuntimeOptions.device == cfg.device == "auto", fn.__qualname__
        assert defaults["precision"] == RuntimeOptions.precision == cfg.precision, fn.__qualname__
        assert defaults["compile"] is CheckpointOptions.compile is cfg.compile is False, fn.__qualname__
    assert inspect.signature(load_captioner).parameters["backend"].default == CheckpointOptions.backend == cfg.backend
    loaded = load_captioner(tiny_checkpoint)
    assert loaded.device == resolve_device(cfg.device) and loaded.backend == "torch"
    assert loaded.precision == resolve_precision(cfg.precision, loaded.device)


def test_backend_onnx_gives_pytorchs_captions_from_an_export_made_once(tiny_checkpoint, tmp_path):
    cache = tmp_path / "cache"
    fast = load_captioner(tiny_checkpoint, backend="onnx", onnx_cache=cache)
    assert fast.backend == "onnx" and len(list(cache.iterdir())) == 1  # one export, keyed by the weights
    again = load_captioner(tiny_checkpoint, backend="onnx", onnx_cache=cache)
    assert again.backend == "onnx" and len(list(cache.iterdir())) == 1
    exact = load_captioner(tiny_checkpoint)
    images = [Image.open(PHOTO)]
    got, want = fast.caption(images, beam_size=3, max_len=8)[0], exact.caption(images, beam_size=3, max_len=8)[0]
    assert [c.tokens for c in got] == [c.tokens for c in want]
    # ONNX Runtime's kernels vs PyTorch's: rounding of a tiny end-to-end captioner's log-probs (<= 8 steps)
    assert_close_f32(torch.tensor([c.score for c in got]), torch.tensor([c.score for c in want]),
                     roundings=8 * TINY_E2E_ROUNDINGS)
    assert fast.runtime.weights() == exact.runtime.weights()  # the export records which weights it holds


def test_the_default_cpu_backend_for_cached_features_is_pytorch(tiny_checkpoint):
    """From cached features PyTorch's cached decoding is the faster exact path on the CPU (no export either)."""
    from deploy.loading import load_one

    assert load_one(tiny_checkpoint, features_only=True).runtime.kind == "torch"
    assert load_one(tiny_checkpoint, features_only=True, backend="onnx").runtime.kind == "onnx"


def test_weights_digest_covers_zero_dimensional_buffers():
    from utils.checkpoint import state_dict_sha256

    a = state_dict_sha256({"bn.num_batches_tracked": torch.tensor(3), "w": torch.zeros(2)})
    b = state_dict_sha256({"bn.num_batches_tracked": torch.tensor(4), "w": torch.zeros(2)})
    assert a != b and len(a) == 64


FAULTS_SCRIPT = r"""
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from utils.runtime import keep_freed_memory

def faults_of_one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.empty(6 << 20) for _ in range(3)]  # 3 x 24 MiB, written, then all freed
    for t in tensors:
        t.fill_(1.0)
    del tensors, t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

applied = keep_freed_memory()
print(applied, *[faults_of_one_round() for _ in range(24)])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_lets_tensors_reuse_pages_without_faulting_them_in_again():
    """With glibc's malloc told to keep freed memory, rounds of the same large tensors settle on reusing the pages
    of earlier rounds (by default glibc may hand 72 MiB freed at the top of its heap back to the kernel, and the
    next round faults its 18,432 pages in again). How many rounds the heap takes to settle varies from run to run
    (1 to 4 seen), so only the last 8 of 24 rounds are held to it."""
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, str(ROOT)], capture_output=True, text=True, check=True)
    applied, *faults = out.stdout.split()
    assert applied == "True"
    assert sum(int(f) for f in faults[-8:]) < 1000, faults


def test_loading_for_the_cpu_prepares_the_decoder_for_few_row_products(tiny_checkpoint):
    captioner = load_captioner(tiny_checkpoint, device="cpu", backend="torch")
    model = captioner.runtime.model
    assert isinstance(model.vocab_linear, PackedLinear) and model.vocab_linear.weight.t().is_contiguous()
    assert all(p.is_contiguous() for n, p in model.named_parameters() if not n.startswith(("decoders.", "vocab_",
                                                                                             "dec_reduce")))
