"""HTTP API for our captioner: ``uvicorn api:app --host 127.0.0.1 --port 5000`` (settings: CAPTION_* variables)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from PIL import Image

from serving import Backend, CaptionParams, ServingSettings, create_app, load_settings
from serving.settings import convert_setting
from utils.cli import CheckpointOptions
from utils.runtime import RuntimeOptions

if TYPE_CHECKING:
    import torch

    from captioner import Captioner

ENV_PREFIX = "CAPTION"
# defaults from the scripts' option fields: the API decodes what demo.py and test.py decode (CAPTION_MAX_LEN too, in
# serving.settings)
MODEL_KEYS: dict[str, str | None] = {"CHECKPOINT": None, "VOCAB": None, "DEVICE": RuntimeOptions.device,
                                     "PRECISION": RuntimeOptions.precision, "BACKEND": CheckpointOptions.backend,
                                     "ONNX_CACHE": None, "COMPILE": str(CheckpointOptions.compile).lower()}


class ExpansionNetBackend:
    """Our checkpoints, model folders or ONNX exports (or official checkpoints with their vocabulary), one model or an
    ensemble, behind the serving Backend protocol."""

    def __init__(self, captioner: Captioner, checkpoint: str) -> None:
        from deploy.checkpoints import require_end_to_end  # here: see load

        require_end_to_end(captioner.config, checkpoint, "be served (the API captions images)")
        self.captioner = captioner
        self.max_len = int(captioner.max_caption_len)  # the model's full length, demo.py's and test.py's cap
        self.weights = captioner.runtime.weights()  # computed once: /ready answers without hashing again

    @classmethod
    def load(cls, model: Mapping[str, str | None], max_pixels: int | None = None) -> ExpansionNetBackend:
        """Load CAPTION_CHECKPOINT (several, comma-separated: an ensemble; + CAPTION_VOCAB for official checkpoints)
        on CAPTION_DEVICE with CAPTION_BACKEND (CAPTION_COMPILE=true: torch.compile'd PyTorch)."""
        from captioner import load_captioner  # here, not at the top: the port opens before torch and the model code

        paths = checkpoint_paths(model)
        compile_model = convert_setting(f"{ENV_PREFIX}_COMPILE", model.get("COMPILE") or False, False)
        setting = {key: model.get(key) or MODEL_KEYS[key] for key in ("DEVICE", "PRECISION", "BACKEND")}
        captioner = load_captioner(paths, device=setting["DEVICE"], vocab=model.get("VOCAB"),
                                   precision=setting["PRECISION"], max_pixels=max_pixels, backend=setting["BACKEND"],
                                   onnx_cache=model.get("ONNX_CACHE"), compile=compile_model)
        return cls(captioner, paths[0])

    def info(self) -> dict[str, Any]:
        """Name, kind, size and weights hash (never a file path), runtime, device and precision."""
        c = self.captioner
        return {"backend": "expansionnet", "name": c.config.name, "kind": c.backend,
                "members": len(getattr(c.runtime, "members", [c.runtime])), **self.weights, "device": str(c.device),
                "precision": c.precision, "vocab_size": len(c.vocab),
                "image_size": c.config.backbone.img_size if c.config.backbone else None, "max_len": self.max_len}

    def check_params(self, params: CaptionParams) -> None:
        if params.repetition_penalty != 1.0 or params.no_repeat_ngram_size != 0:
            raise ValueError("repetition_penalty and no_repeat_ngram_size are not supported by the ExpansionNet "
                             "model (beam search only)")

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """Resize and normalise in the request's decode thread: the queue holds (3, H, W) tensors, not photos."""
        return self.captioner.preprocess([image])[0]

    def caption_batch(self, images: Sequence[Image.Image | torch.Tensor], params: CaptionParams
                      ) -> list[list[tuple[str, float]]]:
        """One beam search over the whole batch (Captioner.caption runs under torch.inference_mode)."""
        results = self.captioner.caption(list(images), beam_size=params.beam_size, max_len=params.max_len,
                                         num_captions=params.num_captions, batch_size=max(1, len(images)))
        return [[(c.text, c.score) for c in captions] for captions in results]


def checkpoint_paths(model: Mapping[str, str | None]) -> list[str]:
    """CAPTION_CHECKPOINT's paths (comma-separated), each existing; RuntimeError naming the setting otherwise. Quick:
    it runs at start-up before the port opens, the model load after."""
    paths = [p.strip() for p in (model.get("CHECKPOINT") or "").split(",") if p.strip()]
    if not paths:
        raise RuntimeError(f"{ENV_PREFIX}_CHECKPOINT is not set: point it (or the key in the "
                           f"{ENV_PREFIX}_API_CONFIG JSON file) to a checkpoint file, model folder or ONNX folder")
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise RuntimeError(f"{ENV_PREFIX}_CHECKPOINT: {', '.join(missing)} does not exist")
    return paths


def load_backend(model: Mapping[str, str | None]) -> Backend:
    """The one place that turns the CAPTION_* model keys into a loaded backend (runs at start-up, not at import)."""
    return ExpansionNetBackend.load(model, max_pixels=None)  # uploads are checked and decoded by serving/


def build_app(environ: Mapping[str, str] | None = None, settings: ServingSettings | None = None) -> FastAPI:
    """The app for CAPTION_* settings (environment, or CAPTION_API_CONFIG); the model loads in the background once the
    server starts (/ready says when it is loaded)."""
    env_settings, model = load_settings(ENV_PREFIX, MODEL_KEYS, path_keys=("CHECKPOINT", "VOCAB", "ONNX_CACHE"),
                                        environ=environ)
    settings = settings or env_settings
    return create_app(lambda: load_backend(model), settings, check_model=lambda: checkpoint_paths(model),
                      repetition_controls=False,  # beam search only: ExpansionNetBackend.check_params refuses them
                      title="ExpansionNet v2 captioning API", env_prefix=ENV_PREFIX,
                      description="Caption images with an ExpansionNet v2 / Optimizer-ExpansionNet checkpoint. "
                                  "The web page at / takes a photo or an image file.")


app = build_app()
