"""Decoding speed: cached (incremental) beam search against full recomputation, and end-to-end captioning images/s.

    python benchmarks/bench_decoding.py                      # CPU: beam 5, batch 8, 20 tokens, both models
                                                             # (encoder timed with the decoding; + ONNX Runtime)
    python benchmarks/bench_decoding.py --device cuda --e2e_batch 64 --precision bf16 --compile
    python benchmarks/bench_decoding.py --device cuda --batch 0 --e2e_batch 64 --precision bf16 --compile \
        --models optimizer_expansionnet --json decoding.json        # the end-to-end figure only, as JSON too

Random weights make every caption run to the maximum length: worst-case decoding cost, as in the reference figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import (  # first: puts the repository root on sys.path
    add_backbone_flags,
    end_to_end_config,
    median_seconds,
    start_run,
)

from data.vocab import Vocabulary
from deploy.onnx_export import export_onnx
from deploy.runtime import OrtRuntime, TorchRuntime
from models import build_model, expansionnet_v2_config, optimizer_expansionnet_config
from models.backbone import backbone_tokens
from models.decoding import beam_search
from utils.runtime import autocast

IDS = {"sos_idx": 79, "eos_idx": 77, "pad_idx": 78}

# Runs in a subprocess inside a user's checkout of the reference code (jchenghu/ExpansionNet_v2), whose packages
# are also called models/ and utils/: builds its features model with our weights (same official layout), prints the
# tokens of its beam search on the same features as JSON, then times one search (the encoder included) for every
# line it reads on stdin and prints the seconds: the parent alternates these with its own timed runs, so both are
# measured over the same minutes of a machine whose speed drifts.
REFERENCE_DRIVER = r"""
import json, sys, time, types
import torch
sys.path.insert(0, ".")
from models.ExpansionNet_v2 import ExpansionNet_v2
args = json.loads(sys.argv[1])
blob = torch.load(args["blob"], weights_only=True)
words = {f"w{i}": i for i in range(args["vocab_size"])}
drop = types.SimpleNamespace(enc=0.0, dec=0.0, enc_input=0.0, dec_input=0.0, other=0.0)
model = ExpansionNet_v2(d_model=args["d_model"], N_enc=args["N_enc"], N_dec=args["N_dec"], ff=args["ff"],
                        num_heads=args["num_heads"], num_exp_enc_list=args["num_exp_enc_list"],
                        num_exp_dec=args["num_exp_dec"], output_word2idx=words, output_idx2word=list(words),
                        max_seq_len=args["max_seq_len"], drop_args=drop, img_feature_dim=args["img_feature_dim"],
                        rank="cpu")
missing, unexpected = model.load_state_dict(blob["state"], strict=False)
assert not missing and not unexpected, (missing, unexpected)
model.eval()
feats = blob["feats"]
def run():
    with torch.no_grad():
        return model(enc_x=feats, enc_x_num_pads=[0] * feats.shape[0], mode="beam_search", beam_size=args["beam"],
                     beam_max_seq_len=args["max_len"] + 1, how_many_outputs=1, sos_idx=args["sos_idx"],
                     eos_idx=args["eos_idx"])
print(json.dumps({"tokens": [caps[0][1:] for caps in run()[0]]}), flush=True)
for _ in sys.stdin:
    t0 = time.perf_counter()
    run()
    print(time.perf_counter() - t0, flush=True)
"""


def interleaved_reference(reference_dir: str, model: torch.nn.Module, cfg, feats: torch.Tensor, beam: int,
                          max_len: int, ours: Callable[[], Any], rounds: int) -> dict:
    """The reference code's beam search (a user's checkout) on the same weights and features, in a subprocess,
    timed in alternation with `ours` (one run of each per round): its tokens, both medians, each round's ratio."""
    import json
    import statistics
    import subprocess
    import time

    with tempfile.TemporaryDirectory() as tmp:
        blob, driver = Path(tmp) / "blob.pth", Path(tmp) / "driver.py"
        torch.save({"state": model.state_dict(), "feats": feats.cpu()}, blob)
        driver.write_text(REFERENCE_DRIVER)
        args = {"blob": str(blob), "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "N_enc": cfg.N_enc,
                "N_dec": cfg.N_dec, "ff": cfg.ff, "num_heads": cfg.num_heads,
                "num_exp_enc_list": list(cfg.num_exp_enc_list), "num_exp_dec": cfg.num_exp_dec,
                "max_seq_len": cfg.max_seq_len, "img_feature_dim": cfg.img_feature_dim, "beam": beam,
                "max_len": max_len, **IDS}
        errors = Path(tmp) / "stderr.txt"
        with errors.open("w") as err:
            proc = subprocess.Popen([sys.executable, str(driver), json.dumps(args)], cwd=reference_dir, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        try:
            first = proc.stdout.readline()
            if not first:
                proc.wait()
                raise RuntimeError(f"the reference code in {reference_dir} failed: {errors.read_text()[-2000:]}")
            tokens = json.loads(first)["tokens"]
            ref_times, our_times = [], []
            for _ in range(rounds):
                proc.stdin.write("time\n")
                proc.stdin.flush()
                ref_times.append(float(proc.stdout.readline()))
                t0 = time.perf_counter()
                ours()
                our_times.append(time.perf_counter() - t0)
        finally:
            proc.stdin.close()
            proc.wait()
    return {"tokens": tokens, "seconds": statistics.median(ref_times), "ours_seconds": statistics.median(our_times),
            "ratios": [r / o for r, o in zip(ref_times, our_times)]}


def bench_cached_vs_full(name: str, device: torch.device, batch: int, beam: int, max_len: int, repeats: int,
                         sync, onnx: bool, reference_dir: str = "") -> dict:
    """Beam search from cached features with the same weights, the encoder included (as a user waits for it):
    incremental decoding (PyTorch, and ONNX Runtime when asked) vs the reference's recomputation of the prefix."""
    cfg_fn = optimizer_expansionnet_config if name == "optimizer_expansionnet" else expansionnet_v2_config
    torch.manual_seed(0)
    cfg = cfg_fn(end_to_end=False)
    model = build_model(cfg)
    with torch.no_grad():
        model.vocab_linear.bias[IDS["eos_idx"]] = -1e4  # no early stop: every caption runs to max_len
    model = TorchRuntime.for_captioning(model, cfg, device).model  # as load_captioner prepares a model to caption
    feats = torch.randn(batch, 144, model.input_linear.in_features, device=device)

    @torch.inference_mode()
    def run(cache: bool):
        memory = model.encode(features=feats)
        return beam_search(model, memory, None, beam_size=beam, max_len=max_len, use_cache=cache, **IDS)

    a, b = run(True), run(False)
    assert torch.equal(a.tokens, b.tokens), "cached and full decoding disagree"
    t_cached = median_seconds(lambda: run(True), repeats, sync)
    t_full = median_seconds(lambda: run(False), max(1, repeats // 2), sync)
    out = {"model": name, "cached_img_s": batch / t_cached, "full_img_s": batch / t_full,
           "speedup": t_full / t_cached}
    if onnx and device.type == "cpu":
        with tempfile.TemporaryDirectory() as tmp:
            vocab = Vocabulary(["PAD", "SOS", "EOS", "UNK"] + [f"w{i}" for i in range(cfg.vocab_size - 4)])
            export_onnx(model, cfg, vocab, tmp, verify=False)
            rt = OrtRuntime(tmp)

            def run_ort():
                return beam_search(rt, rt.encode(features=feats), None, beam_size=beam, max_len=max_len, **IDS)

            assert torch.equal(run_ort().tokens, a.tokens), "ONNX Runtime and PyTorch decoding disagree"
            t_ort = median_seconds(run_ort, repeats, sync, warmup=1)
        out.update(ort_img_s=batch / t_ort, ort_speedup=t_full / t_ort)
    if reference_dir and device.type == "cpu":
        ref = interleaved_reference(reference_dir, model, cfg, feats, beam, max_len, lambda: run(True), repeats)
        out.update(ref_img_s=batch / ref["seconds"], cached_img_s_beside_ref=batch / ref["ours_seconds"],
                   vs_ref_torch=ref["seconds"] / ref["ours_seconds"],
                   ratio_range=(min(ref["ratios"]), max(ref["ratios"])),
                   same_as_ref=ref["tokens"] == a.tokens[:, 0].tolist())
    return out


def bench_end_to_end(name: str, device: torch.device, batch: int, beam: int, max_len: int, precision: str,
                     repeats: int, compile: bool | str, sync, img_size: int = 384, backbone: str = "") -> dict:
    """Captioning images -> captions (backbone + encoder + cached beam search) against the backbone alone.
    compile (True: inductor, or a backend name): torch.compile the backbone and run the cached decoding step
    compiled (fixed-size caches: one graph for the batch shape), as load_captioner(compile=...) does."""
    torch.manual_seed(0)
    model = build_model(end_to_end_config(name, backbone, img_size)).to(device).eval()
    if compile:
        model.swin_transf = torch.compile(model.swin_transf) if compile is True else \
            torch.compile(model.swin_transf, backend=compile)
    with torch.no_grad():
        model.vocab_linear.bias[IDS["eos_idx"]] = -1e4
    images = torch.randn(batch, 3, img_size, img_size, device=device)

    @torch.inference_mode()
    def caption():
        with autocast(device, precision):
            memory = model.encode(images=images)
            return beam_search(model, memory, None, beam_size=beam, max_len=max_len, compile=compile, **IDS)

    @torch.inference_mode()
    def backbone_only():
        with autocast(device, precision):
            return backbone_tokens(model.swin_transf, images)

    caption()
    backbone_only()
    t_cap = median_seconds(caption, repeats, sync)
    t_bb = median_seconds(backbone_only, repeats, sync)
    return {"model": name, "caption_img_s": batch / t_cap, "backbone_img_s": batch / t_bb,
            "share_of_ceiling": t_bb / t_cap}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8, help="images for the cached-vs-full comparison (0 skips it)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--max_len", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--e2e_batch", type=int, default=2, help="images for end-to-end captioning (0 skips it)")
    add_backbone_flags(p, "the end-to-end figure")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="BACKEND",
                   help="end-to-end figure: torch.compile the backbone and the cached decoding step (inductor, or "
                        "the torch.compile backend named)")
    p.add_argument("--models", nargs="+", default=["optimizer_expansionnet", "expansionnet_v2"])
    p.add_argument("--no_onnx", action="store_true", help="skip the ONNX Runtime figure (CPU only)")
    p.add_argument("--reference_dir", default="",
                   help="a checkout of the reference code (jchenghu/ExpansionNet_v2): also time its beam search on the "
                        "same weights and features (ExpansionNet v2 only, CPU)")
    p.add_argument("--json", default="", help="also write the figures (with device, versions, settings) to this file")
    a = p.parse_args()
    device, sync, figures = start_run(a, "bench_decoding")
    for name in a.models if a.batch else []:
        r = bench_cached_vs_full(name, device, a.batch, a.beam, a.max_len, a.repeats, sync, not a.no_onnx,
                                 a.reference_dir if name == "expansionnet_v2" else "")
        line = (f"{name}: beam {a.beam}, batch {a.batch}, {a.max_len} tokens, cached features, encoder included: "
                f"cached {r['cached_img_s']:.1f} img/s, full recomputation {r['full_img_s']:.1f} img/s, "
                f"speed-up {r['speedup']:.1f}x")
        if "ort_img_s" in r:
            line += f"; ONNX Runtime cached {r['ort_img_s']:.1f} img/s, speed-up {r['ort_speedup']:.1f}x"
        if "ref_img_s" in r:
            lo, hi = r["ratio_range"]
            line += (f"; reference code {r['ref_img_s']:.2f} img/s against ours {r['cached_img_s_beside_ref']:.1f} "
                     f"img/s in {a.repeats} alternating rounds: ours {r['vs_ref_torch']:.1f}x (PyTorch; rounds "
                     f"{lo:.1f}-{hi:.1f}x), same captions: {r['same_as_ref']}")
        print(line, flush=True)
        figures.add("cached_vs_full", name, values={**r, "batch": a.batch, "beam": a.beam, "max_len": a.max_len})
    if a.e2e_batch:
        for name in a.models:
            r = bench_end_to_end(name, device, a.e2e_batch, a.beam, a.max_len, a.precision, a.repeats, a.compile,
                                 sync, a.img_size, a.backbone)
            print(f"{name}: end-to-end captioning {a.img_size}px, batch {a.e2e_batch}, beam {a.beam}, {a.precision}: "
                  f"{r['caption_img_s']:.2f} img/s; backbone alone {r['backbone_img_s']:.2f} img/s "
                  f"(captioning reaches {100 * r['share_of_ceiling']:.0f}% of the backbone ceiling)", flush=True)
            figures.add("end_to_end", name, values={
                **r, "batch": a.e2e_batch, "beam": a.beam, "max_len": a.max_len, "precision": a.precision,
                "img_size": a.img_size, "compile": a.compile,
                "backbone": a.backbone or ("swinv2_b" if name == "optimizer_expansionnet" else "swin_l")})
    figures.finish()


if __name__ == "__main__":
    main()
