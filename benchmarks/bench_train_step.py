"""Training-step speed: XE and SCST on cached features, and end-to-end XE, each against a same-run baseline.

    python benchmarks/bench_train_step.py                       # CPU, full-size Optimizer-ExpansionNet
    python benchmarks/bench_train_step.py --device cuda --amp bf16 --compile --xe_batch 48 --scst_batch 24 \
        --e2e_batch 16
    python benchmarks/bench_train_step.py --device cuda --amp bf16 --xe_batch 0 --scst_batch 0 --e2e_batch 16 \
        --json e2e.json                                          # one figure only (a batch of 0 skips a step)

Baselines, measured in the same run with the same weights:
  XE:   the reference's step (fp32, per-parameter optimizer loop) against ours (foreach RAdam, optional AMP/compile);
  SCST: the reference's formulation (sampling with gradient, the whole prefix recomputed at every step) against ours
        (cached sampling without gradient + one teacher-forced pass); both include the vectorised CIDEr-D reward;
  e2e:  caption-wise batches (the backbone runs once per caption) against captions grouped by image.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from common import end_to_end_config, median_seconds, start_run  # first: puts the repository root on sys.path

from eval.cider import CiderD
from losses import LabelSmoothingLoss, scst_loss, scst_rewards
from models import build_model, optimizer_expansionnet_config
from models.config import DROPOUTS
from models.decoding import compiled, sample
from utils.runtime import autocast

V, SOS, EOS, PAD = 10000, 79, 77, 78


def random_captions(n: int, length: int, device) -> torch.Tensor:
    toks = torch.randint(100, V, (n, length), device=device)
    toks[:, 0] = SOS
    toks[:, -1] = EOS
    return toks


def bench_xe(device, batch: int, precision: str, repeats: int, sync, compile_model: bool | str, warmup: int = 1
             ) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model(optimizer_expansionnet_config(end_to_end=False, **dict.fromkeys(DROPOUTS, 0.3))).to(device)
    loss_fn = LabelSmoothingLoss(V, PAD)
    feats = torch.randn(batch, 144, 1024, device=device)
    toks = random_captions(batch, 16, device)

    def make_step(opt, m, prec):
        def step():
            with autocast(device, prec):
                logits = m(toks[:, :-1], features=feats)
            loss, n = loss_fn(logits, toks[:, 1:])
            (loss / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    ref_opt = torch.optim.RAdam(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-9, foreach=False)
    t_ref = median_seconds(make_step(ref_opt, model, "fp32"), repeats, sync, warmup=warmup)
    fast = model if not compile_model else torch.compile(model) if compile_model is True else \
        torch.compile(model, backend=compile_model)
    opt = torch.optim.RAdam(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-9, foreach=True)
    t_ours = median_seconds(make_step(opt, fast, precision), repeats, sync, warmup=warmup)
    return batch / t_ref, batch / t_ours


def bench_scst(device, batch: int, precision: str, repeats: int, sync, k: int = 5, max_len: int = 20,
               compile_model: bool | str = False, warmup: int = 1) -> tuple[float, float, float]:
    """Ours as the trainer's SCST step: under compile (train.py --compile) the encoder, the sampling steps and the
    re-scoring pass run compiled."""
    torch.manual_seed(0)
    model = build_model(optimizer_expansionnet_config(end_to_end=False, **dict.fromkeys(DROPOUTS, 0.1))).to(device)
    model.train()
    opt = torch.optim.RAdam(model.parameters(), lr=1e-6, betas=(0.9, 0.98), eps=1e-9, foreach=True)
    feats = torch.randn(batch, 144, 1024, device=device)
    refs = [[" ".join(f"w{(i * 7 + j * 3 + t) % 500}" for t in range(10)) + " EOS" for j in range(5)]
            for i in range(batch)]
    scorer = CiderD(df_refs=refs)

    def reward(tokens: torch.Tensor, lengths: torch.Tensor):
        rows = tokens.cpu().tolist()
        hyps = [" ".join(f"w{t % 500}" for t in r[:n]) for r, n in zip(rows, lengths.tolist())]
        return scst_rewards(scorer, hyps, [r for r in refs for _ in range(k)], k)

    encode = partial(compiled("encode", compile_model), model) if compile_model else model.encode
    decode = partial(compiled("decode", compile_model), model) if compile_model else model.decode

    def ours():
        with autocast(device, precision):
            memory = encode(features=feats)
            with torch.no_grad():
                out = sample(model, memory.detach(), None, sos_idx=SOS, eos_idx=EOS, pad_idx=PAD, num_samples=k,
                             max_len=max_len, compile=compile_model)
            tokens, lengths = out.tokens.flatten(0, 1), out.lengths.flatten()
            inputs = torch.cat([torch.full_like(tokens[:, :1], SOS), tokens[:, :-1]], 1)
            logits = decode(inputs, memory, caption_index=torch.arange(batch, device=device).repeat_interleave(k))
        logp = F.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]
        mask = (torch.arange(tokens.shape[1], device=device)[None] < lengths[:, None]).float()
        r, b = reward(tokens, lengths)
        scst_loss(logp, mask, r, b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def reference():
        memory = model.encode(features=feats).repeat_interleave(k, 0)
        prefix = torch.full((batch * k, 1), SOS, device=device)
        lps, done = [], torch.zeros(batch * k, dtype=torch.bool, device=device)
        for _ in range(max_len):  # the whole prefix again at every step, with the graph kept
            logp = F.log_softmax(model.decode(prefix, memory)[:, -1].float(), -1)
            tok = torch.multinomial(logp.detach().exp(), 1)[:, 0]
            lps.append(logp.gather(1, tok[:, None])[:, 0] * (~done))
            prefix = torch.cat([prefix, tok[:, None]], 1)
            done = done | (tok == EOS)
            if bool(done.all()):
                break
        tokens = prefix[:, 1:]
        lengths = torch.full((batch * k,), tokens.shape[1], device=device)
        r, b = reward(tokens, lengths)
        scst_loss(torch.stack(lps, 1), torch.ones_like(tokens, dtype=torch.float), r, b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_reward = median_seconds(lambda: reward(random_captions(batch * k, max_len, device),
                                    torch.full((batch * k,), max_len)), repeats, sync, warmup=1)
    t_ref = median_seconds(reference, max(1, repeats // 2), sync, warmup=warmup)
    t_ours = median_seconds(ours, repeats, sync, warmup=warmup)
    return batch / t_ref, batch / t_ours, t_reward * 1000


def bench_e2e(device, batch: int, img_size: int, precision: str, repeats: int, sync, backbone: str = "",
              warmup: int = 1) -> tuple[float, float, float, float]:
    """Caption-pairs/s of one XE step with 5 captions per image: caption-wise (backbone x5) vs grouped (backbone x1),
    and the peak GPU memory (GiB) of each (nan on the CPU)."""
    torch.manual_seed(0)
    model = build_model(end_to_end_config("optimizer_expansionnet", backbone, img_size)).to(device)
    opt = torch.optim.RAdam(model.parameters(), lr=1e-6, betas=(0.9, 0.98), eps=1e-9, foreach=True)
    loss_fn = LabelSmoothingLoss(V, PAD)
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    toks = random_captions(batch * 5, 16, device)
    index = torch.arange(batch, device=device).repeat_interleave(5)

    def step(grouped: bool):
        with autocast(device, precision):
            if grouped:
                logits = model(toks[:, :-1], images=images, caption_index=index)
            else:  # the reference: one caption per sample, the image encoded again for each
                logits = model(toks[:batch, :-1], images=images[index[:batch]])
        tgt = toks[:, 1:] if grouped else toks[:batch, 1:]
        loss, n = loss_fn(logits, tgt)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def peak_gib(fn) -> tuple[float, float]:
        """(median seconds, peak GiB) of fn's steps."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = median_seconds(fn, repeats, sync, warmup=warmup)
        return t, torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    t_caption, peak_caption = peak_gib(lambda: step(False))
    t_grouped, peak_grouped = peak_gib(lambda: step(True))
    # caption-wise processes `batch` caption pairs per step; grouped processes 5 x batch
    return batch / t_caption, 5 * batch / t_grouped, peak_caption, peak_grouped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", "--precision", dest="amp", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="BACKEND",
                   help="torch.compile our XE step and SCST's pieces (inductor, or the torch.compile backend named)")
    p.add_argument("--xe_batch", type=int, default=48, help="0 skips the XE step on features")
    p.add_argument("--scst_batch", type=int, default=24, help="0 skips the SCST step on features")
    p.add_argument("--e2e_batch", type=int, default=2, help="0 skips the end-to-end step")
    p.add_argument("--e2e_img_size", type=int, default=384)
    p.add_argument("--backbone", default="",
                   help="another named backbone size for the end-to-end step (models.config.BACKBONE_SIZES, e.g. "
                        "swinv2_tiny for a quick dry run; default: SwinV2-B)")
    p.add_argument("--scst_max_len", type=int, default=20, help="tokens sampled per SCST caption")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps before the timed ones (compilation happens there; 0 only for a quick dry run)")
    p.add_argument("--json", default="", help="also write the figures (with device, versions, settings) to this file")
    a = p.parse_args()
    device, sync, figures = start_run(a, "bench_train_step", f", {a.amp}")
    if a.xe_batch:
        ref, ours = bench_xe(device, a.xe_batch, a.amp, a.repeats, sync, a.compile, a.warmup)
        print(f"XE step on cached features, batch {a.xe_batch}: reference-style {ref:.1f} img/s, ours {ours:.1f} "
              f"img/s ({ours / ref:.2f}x)", flush=True)
        figures.add("xe", values={"reference_style_img_s": ref, "ours_img_s": ours, "ratio": ours / ref,
                                  "batch": a.xe_batch, "precision": a.amp, "compile": a.compile})
    if a.scst_batch:
        ref, ours, reward_ms = bench_scst(device, a.scst_batch, a.amp, a.repeats, sync, max_len=a.scst_max_len,
                                          compile_model=a.compile, warmup=a.warmup)
        print(f"SCST step on cached features, batch {a.scst_batch} x 5 samples, reward included: reference "
              f"formulation {ref:.2f} img/s, ours {ours:.2f} img/s ({ours / ref:.1f}x); the CIDEr-D reward alone "
              f"{reward_ms:.1f} ms", flush=True)
        figures.add("scst", values={"reference_formulation_img_s": ref, "ours_img_s": ours, "ratio": ours / ref,
                                    "reward_ms": reward_ms, "batch": a.scst_batch, "samples": 5,
                                    "max_len": a.scst_max_len,
                                    "precision": a.amp, "compile": a.compile})
    if a.e2e_batch:
        cap, grouped, peak_cap, peak_grouped = bench_e2e(device, a.e2e_batch, a.e2e_img_size, a.amp, a.repeats,
                                                         sync, a.backbone, a.warmup)
        peak = max(peak_cap, peak_grouped)
        print(f"end-to-end XE step, {a.backbone or 'SwinV2-B'} at {a.e2e_img_size}px, batch {a.e2e_batch}: "
              f"caption-wise {cap:.2f} caption-pairs/s, grouped by image {grouped:.2f} caption-pairs/s "
              f"({grouped / cap:.1f}x)"
              + (f", peak memory {peak:.1f} GiB" if device.type == "cuda" else ""), flush=True)
        figures.add("e2e_xe", values={
            "caption_wise_pairs_s": cap, "grouped_pairs_s": grouped, "grouped_img_s": grouped / 5,
            "ratio": grouped / cap, "peak_gib_caption_wise": peak_cap, "peak_gib_grouped": peak_grouped,
            "peak_gib": peak, "batch": a.e2e_batch, "captions_per_image": 5, "img_size": a.e2e_img_size,
            "backbone": a.backbone or "swinv2_b", "precision": a.amp})
    figures.finish()


if __name__ == "__main__":
    main()
