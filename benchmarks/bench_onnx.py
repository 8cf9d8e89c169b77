"""CPU captioning speed by runtime, side by side in one run: PyTorch fp32, ONNX Runtime fp32 (the same function up to
float32 rounding), PyTorch bf16 autocast and dynamic int8 quantisation of the decoder's linear layers (approximations);
for each, the agreement of its captions with PyTorch fp32's is reported.

    python benchmarks/bench_onnx.py                       # seed model, random weights, 384 px, batch 1 and 8, beam 5
    python benchmarks/bench_onnx.py --batches 8 --repeats 3 --onnx_dir /tmp/seed_onnx   # reuse an export

End to end: preprocessed images -> backbone -> encoder -> beam search -> tokens. Random weights make every caption
run to the maximum length (the worst case); agreement = share of images whose best caption is token for token the
fp32 PyTorch one (with random weights the top words are nearly tied, so this is a pessimistic figure).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from common import median_seconds  # first: puts the repository root on sys.path

from data.vocab import Vocabulary
from deploy.onnx_export import export_onnx
from deploy.runtime import OrtRuntime, TorchRuntime
from models import build_model, optimizer_expansionnet_config
from models.decoding import beam_search
from utils.runtime import keep_freed_memory

IDS = {"sos_idx": 1, "eos_idx": 2, "pad_idx": 0}


def quantized_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with the decoder's linear layers (decoder layers, layer reduction, vocabulary projection) as dynamic
    int8 (weights int8, activations quantised per call); backbone and encoder stay fp32."""
    import warnings

    warnings.filterwarnings("ignore", message=".*(deprecated|quantize_per_tensor).*")
    from torch.ao.quantization import quantize_dynamic

    q = copy.deepcopy(model)
    for name in ("decoders", "dec_reduce_group", "vocab_linear"):
        setattr(q, name, quantize_dynamic(getattr(q, name), {torch.nn.Linear}, dtype=torch.qint8))
    return q


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--max_len", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--agreement_images", type=int, default=8, help="images for the agreement of inexact runtimes")
    p.add_argument("--onnx_dir", default="", help="existing export of the same seed model (else a temporary one)")
    a = p.parse_args()
    torch.manual_seed(0)
    cfg = optimizer_expansionnet_config()
    model = build_model(cfg).eval()
    vocab = Vocabulary(["PAD", "SOS", "EOS", "UNK"] + [f"w{i}" for i in range(cfg.vocab_size - 4)])
    tmp = None
    onnx_dir = Path(a.onnx_dir) if a.onnx_dir else None
    if onnx_dir is None or not (onnx_dir / "decoder_step.onnx").exists():
        if onnx_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="bench-onnx-")
            onnx_dir = Path(tmp.name)
        r = export_onnx(model, cfg, vocab, onnx_dir)
        print(f"exported the seed model in {r.seconds:.0f} s (step log-probs within {r.max_abs_logprob_diff:.1g})")
    cpu = torch.device("cpu")
    keep_freed_memory()  # process-wide (load_captioner's PyTorch runtime applies it): every runtime below gets it
    runtimes = {
        "pytorch fp32": TorchRuntime.for_captioning(copy.deepcopy(model), cfg, cpu, "fp32"),  # as load_captioner
        "onnxruntime fp32": OrtRuntime(onnx_dir, cpu),
        "pytorch bf16 autocast": TorchRuntime(model, cfg, cpu, "bf16"),
        "pytorch int8 decoder": TorchRuntime(quantized_decoder(model), cfg, cpu, "fp32"),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; seed model (SwinV2-B 384 px, 2 + 2 "
          f"layers), random weights, beam {a.beam}, {a.max_len} tokens, end to end")

    @torch.inference_mode()
    def caption(rt, images):
        return beam_search(rt, rt.encode(images=images), None, beam_size=a.beam, max_len=a.max_len, **IDS).tokens

    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(a.agreement_images, 3, 384, 384, generator=gen)
    reference = caption(runtimes["pytorch fp32"], pool)
    warm = set()
    for batch in a.batches:
        images = pool[:batch] if batch <= len(pool) else torch.randn(batch, 3, 384, 384, generator=gen)
        base = None
        for name, rt in runtimes.items():
            if name not in warm:
                caption(rt, images[:1])  # warm-up (first call of each runtime)
                warm.add(name)
            t = median_seconds(lambda rt=rt, images=images: caption(rt, images), a.repeats)
            base = base or t
            line = f"batch {batch}: {name:22s} {batch / t:6.3f} img/s  ({base / t:.2f}x pytorch fp32)"
            if batch == a.batches[0]:
                same = (caption(rt, pool)[:, 0] == reference[:, 0]).all(-1).float().mean().item()
                line += f"  captions unchanged on {100 * same:.0f}% of {len(pool)} images"
            print(line, flush=True)


if __name__ == "__main__":
    main()
