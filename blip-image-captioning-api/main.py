"""BLIP captioning API: ``uvicorn main:app --port 5001`` serves a local BlipForConditionalGeneration (BLIP_* vars)."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from PIL import Image

# Shim: the shared serving code is the repo root's `serving/` package; put the root on sys.path so that
# `uvicorn main:app` works from this folder, as in the seed.
if (_ROOT := str(Path(__file__).resolve().parents[1])) not in sys.path:
    sys.path.insert(0, _ROOT)
from serving import CaptionParams, ServingSettings, create_app, load_settings, weights_summary  # noqa: E402

ENV_PREFIX = "BLIP"
MODEL_KEYS: dict[str, str | None] = {"MODEL_DIR": None, "DEVICE": "cpu", "PRECISION": "auto", "PROMPT": None}
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# the seed's BLIP defaults: 20 new tokens (transformers' default length), at most 64 (BLIP-base's own length: 511)
DEFAULTS = ServingSettings(max_len=20, max_len_limit=64)


class BlipBackend:
    """Hugging Face BlipForConditionalGeneration + BlipProcessor from a local directory, behind the Backend protocol."""

    def __init__(self, model: Any, processor: Any, model_dir: str, prompt: str | None = None) -> None:
        self.model = model.eval()
        self.processor = processor
        self.name = Path(model_dir).name  # the folder's name only: /ready never shows a path
        self.prompt = prompt or None
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        text = model.config.text_config
        prompt_tokens = len(processor.tokenizer(self.prompt)["input_ids"]) if self.prompt else 1
        self.max_len = int(text.max_position_embeddings) - prompt_tokens

    @classmethod
    def load(cls, model: Mapping[str, str | None]) -> BlipBackend:
        """Load BLIP_MODEL_DIR offline (local_files_only): fp32 on CPU, bf16 (or fp16) on a GPU unless told."""
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        from utils.runtime import resolve_device, resolve_precision

        model_dir = model_folder(model)
        device = resolve_device(model.get("DEVICE") or "cpu")
        requested = model.get("PRECISION") or "auto"
        precision = resolve_precision(requested, device)
        if requested == "auto" and device.type == "cuda" and precision == "fp32":
            precision = "fp16"  # a GPU without bf16 support
        if device.type == "cpu" and precision == "fp16":
            raise RuntimeError("fp16 on the CPU is not supported for BLIP; use fp32 (the default) or bf16")
        dtype = getattr(torch, _DTYPES[precision])
        net = BlipForConditionalGeneration.from_pretrained(model_dir, local_files_only=True, dtype=dtype).to(device)
        processor = BlipProcessor.from_pretrained(model_dir, local_files_only=True)
        return cls(net, processor, str(model_dir), prompt=model.get("PROMPT"))

    def info(self) -> dict[str, Any]:
        """Name, kind, size and weights hash (never the model directory's path), device, dtype and prompt."""
        return {"backend": "blip", "name": self.name, "kind": type(self.model).__name__, **weights_summary(self.model),
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "vocab_size": len(self.processor.tokenizer), "max_len": self.max_len, "prompt": self.prompt}

    def check_params(self, params: CaptionParams) -> None:
        """Every parameter is supported; HF needs num_return_sequences <= num_beams, which the app checks."""

    def prepare(self, image: Image.Image) -> Any:
        """The processor's resize and normalisation, run in the request's decode thread: a (3, H, W) fp32 tensor."""
        return self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def caption_batch(self, images: Sequence[Any], params: CaptionParams) -> list[list[tuple[str, float]]]:
        """Generate under inference mode for PIL images or prepared tensors; scores are mean log-probabilities."""
        import torch

        with torch.inference_mode():
            items = [self.prepare(x) if isinstance(x, Image.Image) else x for x in images]
            pixel_values = torch.stack(items).to(self.device, self.dtype)  # the processor gives fp32
            extra = {}
            if self.prompt:
                tokens = self.processor.tokenizer([self.prompt] * len(items), return_tensors="pt")
                extra = {"input_ids": tokens["input_ids"].to(self.device),
                         "attention_mask": tokens["attention_mask"].to(self.device)}
            out = self.model.generate(
                pixel_values=pixel_values, max_new_tokens=params.max_len, num_beams=params.beam_size,
                num_return_sequences=params.num_captions, repetition_penalty=params.repetition_penalty,
                no_repeat_ngram_size=params.no_repeat_ngram_size, do_sample=False, return_dict_in_generate=True,
                output_scores=True, **extra)
            texts = self.processor.batch_decode(out.sequences, skip_special_tokens=True)
            scores = self._scores(out, params)
        n = params.num_captions
        pairs = [(t.strip(), s) for t, s in zip(texts, scores)]
        return [pairs[i * n:(i + 1) * n] for i in range(len(images))]

    def _scores(self, out: Any, params: CaptionParams) -> list[float]:
        """Beam search: its length-normalised sequence scores; greedy: the mean token log-probability up to EOS."""
        if params.beam_size > 1 and getattr(out, "sequences_scores", None) is not None:
            return out.sequences_scores.float().cpu().tolist()
        steps = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).float().cpu()
        generated = out.sequences[:, -steps.shape[1]:].cpu()
        eos = self.model.config.text_config.sep_token_id
        result = []
        for row_scores, row_tokens in zip(steps.tolist(), generated.tolist()):
            end = row_tokens.index(eos) + 1 if eos in row_tokens else len(row_tokens)
            kept = row_scores[:end]
            result.append(sum(kept) / max(1, len(kept)))
        return result


def model_folder(model: Mapping[str, str | None]) -> str:
    """BLIP_MODEL_DIR, checked to hold a saved model; RuntimeError naming the setting otherwise. Quick: it runs at
    start-up before the port opens, the model load after."""
    model_dir = model.get("MODEL_DIR")
    if not model_dir:
        raise RuntimeError(f"{ENV_PREFIX}_MODEL_DIR is not set: point it to a local directory saved with "
                           "save_pretrained (model and BlipProcessor); nothing is downloaded")
    if not Path(model_dir, "config.json").is_file():
        raise RuntimeError(f"{ENV_PREFIX}_MODEL_DIR={model_dir} holds no config.json: save the model and its "
                           "processor there with save_pretrained (nothing is downloaded at run time)")
    return model_dir


def build_app(environ: Mapping[str, str] | None = None, settings: ServingSettings | None = None) -> FastAPI:
    """The BLIP app for BLIP_* settings (environment, or BLIP_API_CONFIG); the model loads in the background once the
    server starts (/ready says when it is loaded)."""
    env_settings, model = load_settings(ENV_PREFIX, MODEL_KEYS, path_keys=("MODEL_DIR",), environ=environ,
                                        defaults=DEFAULTS)
    return create_app(lambda: BlipBackend.load(model), settings or env_settings, title="BLIP captioning API",
                      env_prefix=ENV_PREFIX, check_model=lambda: model_folder(model),
                      description="Caption images with a local Hugging Face BLIP model (BLIP_MODEL_DIR).")


app = build_app()
