"""Export a captioner to ONNX from the one model definition: an encoder graph and a decoder-step graph.

encoder.onnx       images (B, 3, H, W) [or features (B, N, C)] -> cross_k.i, cross_v.i (B, h, S, d_k) per decoder
                   layer (the encoder memory projected once per image); dynamic batch.
decoder_step.onnx  tokens (R,), position (1,), beam_index (R,), cross_k.i / cross_v.i (B, ...), and per decoder layer
                   the past dynamic-expansion caches past.i.<name> (R, t * rows, D) for each name and rows per
                   position of models.dynamic_expansion.cached_rows (k, va, vb, cond: 1; ca, cb: E)
                   -> logprobs (R, V) float32 and present.i.* (the past re-ordered by beam_index, with position t
                   appended). R = B x hypotheses per image; every axis but the model's widths is dynamic.

Both graphs trace ExpansionNet.encode / cross_caches / step. The step runs on a ConcatExpansionCache, so the graph
holds RowsCache.step: the step PyTorch runs in training mode and compiled (on other caches of the same rows), not
the eval-mode ForwardWeightsCache step of eager PyTorch decoding, which equals it up to the rounding of another
summation order. The export is checked with onnx.checker, run once with ONNX Runtime and compared with PyTorch (up
to its precision's tolerance) before it is reported.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data.vocab import Vocabulary
from deploy.folder import write_model_card
from deploy.runtime import DECODER_FILE, ENCODER_FILE, ONNX_FORMAT, OrtRuntime
from models import ExpansionNet, ModelConfig, count_parameters
from models.cache import CrossAttentionCache
from models.decoding import TorchStepper
from models.dynamic_expansion import ConcatExpansionCache, cached_rows
from utils.checkpoint import state_dict_sha256

PAST = tuple(cached_rows(num_exp=1))  # the names of each layer's past / present tensors
DEFAULT_OPSET = 17
PRECISIONS = ("fp32", "fp16")


class _EncoderGraph(nn.Module):
    def __init__(self, model: ExpansionNet, end_to_end: bool) -> None:
        super().__init__()
        self.model, self.end_to_end = model, end_to_end

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        memory = self.model.encode(images=x) if self.end_to_end else self.model.encode(features=x)
        return tuple(t for c in self.model.cross_caches(memory, None) for t in (c.k, c.v))


class _StepGraph(nn.Module):
    def __init__(self, model: ExpansionNet) -> None:
        super().__init__()
        self.model = model
        self.layers = len(model.decoders)

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, beam_index: torch.Tensor,
                *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = self.layers
        cross = [CrossAttentionCache(caches[2 * i], caches[2 * i + 1], None) for i in range(n)]
        past = caches[2 * n:]
        dyn = [ConcatExpansionCache({name: past[len(PAST) * i + j].index_select(0, beam_index)
                                     for j, name in enumerate(PAST)}) for i in range(n)]
        logits = self.model.step(tokens, position, cross, dyn)
        return (F.log_softmax(logits.float(), dim=-1), *[c.present[name] for c in dyn for name in PAST])


@dataclass
class ExportResult:
    folder: Path
    encoder: Path
    decoder: Path
    max_abs_logprob_diff: float
    seconds: float


def io_names(n_dec: int) -> dict[str, Any]:
    cross = [f"cross_{kv}.{i}" for i in range(n_dec) for kv in ("k", "v")]
    return {"cross": cross, "past": [f"past.{i}.{name}" for i in range(n_dec) for name in PAST],
            "present": [f"present.{i}.{name}" for i in range(n_dec) for name in PAST]}


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_axes: dict[str, dict[int, str]], opset: int) -> None:
    """The TorchScript-based exporter: dynamic axes by name, no onnxscript needed (torch 2.11 to 2.14)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notice of the TorchScript exporter, tracer notes
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True)


def export_onnx(model: ExpansionNet, config: ModelConfig, vocab: Vocabulary, output: str | Path, *,
                precision: str = "fp32", opset: int = DEFAULT_OPSET, source: str = "",
                card_extra: dict[str, Any] | None = None, training: dict[str, Any] | None = None,
                verify: bool = True) -> ExportResult:
    """Write encoder.onnx, decoder_step.onnx, config.json, vocab.json and README.md into `output`, check both
    graphs with onnx.checker and (verify) run them once with ONNX Runtime against PyTorch on random inputs."""
    import onnx

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    t0 = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model = model.eval().cpu()
    dtype = torch.float16 if precision == "fp16" else torch.float32
    graph_model = copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model
    names = io_names(len(model.decoders))
    gen = torch.Generator().manual_seed(0)
    enc_in, x = _random_encoder_input(config, 2, 5, gen)
    enc_path, dec_path = out / ENCODER_FILE, out / DECODER_FILE
    with torch.no_grad():
        cross = _export_encoder(graph_model, enc_in, x.to(dtype), enc_path, names, opset)
        _export_step(graph_model, config, cross, dec_path, names, gen, opset)
    for path in (enc_path, dec_path):
        onnx.checker.check_model(str(path), full_check=True)
    _write_folder(out, model, config, vocab, enc_in, names, precision=precision, opset=opset, source=source,
                  card_extra=card_extra, training=training)
    diff = verify_export(out, model, config) if verify else float("nan")
    model.train(was_training)
    return ExportResult(out, enc_path, dec_path, diff, time.perf_counter() - t0)


def _random_encoder_input(config: ModelConfig, batch: int, tokens: int, gen: torch.Generator
                          ) -> tuple[str, torch.Tensor]:
    """The encoder's input name and a random input: images (batch, 3, side, side), or features (batch, tokens, C)."""
    if config.backbone is not None:
        size = config.backbone.img_size
        return "images", torch.randn(batch, 3, size, size, generator=gen)
    return "features", torch.randn(batch, tokens, config.img_feature_dim, generator=gen)


def _rows_per_position(past_name: str, num_exp: int) -> int:
    """Rows a past tensor (past.i.<name>) gains per position (models.dynamic_expansion.cached_rows)."""
    return cached_rows(num_exp)[past_name.rsplit(".", 1)[-1]]


def _export_encoder(graph_model: ExpansionNet, enc_in: str, x: torch.Tensor, path: Path, names: dict[str, Any],
                    opset: int) -> tuple[torch.Tensor, ...]:
    """encoder.onnx (dynamic batch, and token count for features), traced on x; returns its outputs on x."""
    encoder = _EncoderGraph(graph_model, enc_in == "images").eval()  # eval: the exporter restores this mode after
    cross = encoder(x)
    axes = {enc_in: {0: "batch"} if enc_in == "images" else {0: "batch", 1: "tokens"},
            **{n: {0: "batch", 2: "keys"} for n in names["cross"]}}
    _export(encoder, (x,), path, [enc_in], names["cross"], axes, opset)
    return cross


def _export_step(graph_model: ExpansionNet, config: ModelConfig, cross: tuple[torch.Tensor, ...], path: Path,
                 names: dict[str, Any], gen: torch.Generator, opset: int) -> None:
    """decoder_step.onnx, traced on 2 images x 3 hypotheses with 2 past positions (so no axis is traced as a
    constant) over the encoder's example outputs `cross`."""
    group, past_len = 3, 2
    rows, dtype = 2 * group, cross[0].dtype
    past = [torch.randn(rows, past_len * _rows_per_position(name, graph_model.num_exp_dec), config.d_model,
                        generator=gen).to(dtype) for _ in graph_model.decoders for name in PAST]
    tokens = torch.randint(4, config.vocab_size, (rows,), generator=gen)
    position, beam_index = torch.tensor([past_len]), torch.tensor([2, 0, 1, 5, 5, 3])
    step_inputs = ["tokens", "position", "beam_index", *names["cross"], *names["past"]]
    step_outputs = ["logprobs", *names["present"]]
    axes = {"tokens": {0: "rows"}, "beam_index": {0: "rows"}, "logprobs": {0: "rows"},
            **{n: {0: "batch", 2: "keys"} for n in names["cross"]}}
    for p_name, q_name in zip(names["past"], names["present"]):
        axes[p_name] = {0: "rows", 1: "past_" + p_name.rsplit(".", 1)[1]}
        axes[q_name] = {0: "rows", 1: "present_" + q_name.rsplit(".", 1)[1]}
    step = _StepGraph(graph_model).eval()
    _export(step, (tokens, position, beam_index, *cross, *past), path, step_inputs, step_outputs, axes, opset)


def _write_folder(out: Path, model: ExpansionNet, config: ModelConfig, vocab: Vocabulary, enc_in: str,
                  names: dict[str, Any], *, precision: str, opset: int, source: str,
                  card_extra: dict[str, Any] | None, training: dict[str, Any] | None) -> None:
    """vocab.json, README.md, then config.json (the manifest: written last, it marks a complete export)."""
    manifest = {
        "format": ONNX_FORMAT, "format_version": 1, "precision": precision, "opset": opset,
        "model_config": config.to_dict(), "source": source, "training": training or {},
        "parameters": count_parameters(model), "weights_sha256": state_dict_sha256(model.state_dict()),
        "torch_version": torch.__version__,
        "io": {"encoder_input": enc_in, **names,
               "past_rows_per_position": [_rows_per_position(n, model.num_exp_dec) for n in names["past"]]},
    }
    vocab.save(out / "vocab.json", overwrite=True)
    write_model_card(out, config, vocab, count_parameters(model), source=source, extra=card_extra,
                     files={ENCODER_FILE: "backbone + encoder graph", DECODER_FILE: "one decoder step with caches"},
                     onnx={"precision": precision, "opset": opset})
    (out / "config.json").write_text(json.dumps(manifest, indent=1) + "\n")


def verify_export(folder: Path, model: ExpansionNet, config: ModelConfig, batch: int = 2, steps: int = 3) -> float:
    """Run the exported graphs once with ONNX Runtime (greedy steps on random inputs) and return the largest
    absolute difference of step log-probs against PyTorch fp32; raise when the graphs cannot run or disagree
    beyond what their precision allows (1e-3 fp32, 0.5 fp16)."""
    rt = OrtRuntime(folder, "cpu")
    name, value = _random_encoder_input(config, batch, 7, torch.Generator().manual_seed(1))
    x = {name: value}
    memory = rt.encode(**x)
    with torch.no_grad():
        ref = TorchStepper(model, model.encode(**x), None, 2, steps + 1)
    ort_step = rt.stepper(memory, None, 2, steps + 1)
    prefix = torch.full((batch * 2, 1), 1, dtype=torch.long)
    worst = 0.0
    for _ in range(steps):
        with torch.no_grad():
            a = ref.logprobs(prefix)
        b = ort_step.logprobs(prefix)
        if not torch.isfinite(b).all():
            raise RuntimeError(f"ONNX Runtime produced non-finite log-probs from {folder}")
        worst = max(worst, float((a - b).abs().max()))
        index = torch.arange(batch * 2).view(batch, 2).flip(1).reshape(-1)  # swap the two hypotheses of each image
        ref.reorder(index)
        ort_step.reorder(index)
        prefix = torch.cat([prefix.index_select(0, index), a.argmax(-1, keepdim=True)], dim=1)
    limit = 0.5 if rt.precision == "fp16" else 1e-3
    if not worst <= limit:
        raise RuntimeError(f"exported graphs in {folder} disagree with PyTorch: step log-probs differ by {worst:.3g} "
                           f"(limit {limit} at {rt.precision})")
    return worst


def onnx_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(Path(folder).glob("*.onnx*"))}
