"""Contract tests of the BLIP API (blip-image-captioning-api/main.py) with a tiny random BLIP saved locally."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from numerics import TINY_E2E_ROUNDINGS, assert_close_f32
from PIL import Image
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
)

from serving.testing import image_bytes, ready_client, uvicorn_server

ROOT = Path(__file__).resolve().parents[1]
BLIP_DIR = ROOT / "blip-image-captioning-api"
WORDS = ["a", "an", "the", "picture", "photo", "of", "cat", "dog", "man", "woman", "people", "sitting", "standing",
         "on", "in", "with", "and", "next", "to", "red", "blue", "green", "white", "black", "small", "large", "sofa",
         "table", "street", "car", "bird", "tree", "sky", "water", "boat", "plate", "food", "grass", "two", "is"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PNG = image_bytes((50, 40))


def pil_image() -> Image.Image:
    return Image.new("RGB", (50, 40), (200, 30, 30))


def build_tiny_blip(directory: Path, positions: int = 64) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """A random BLIP (vision 32 px, patch 16, hidden 32, one layer, ``positions`` text positions) and its processor,
    saved to directory."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory.parent / "vocab.txt"
    vocab_file.write_text("\n".join(SPECIALS + WORDS) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab_file))  # transformers 5: vocab=, not vocab_file=
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    config = BlipConfig(
        vision_config={"image_size": 32, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": positions,
                     "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id,
                     "eos_token_id": tokenizer.sep_token_id, "sep_token_id": tokenizer.sep_token_id},
        projection_dim=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


def load_main() -> ModuleType:
    """blip-image-captioning-api/main.py as a module (its folder name is not importable)."""
    spec = importlib.util.spec_from_file_location("blip_api_main", BLIP_DIR / "main.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("blip") / "model"
    build_tiny_blip(directory)
    return directory


@pytest.fixture(scope="module")
def main() -> ModuleType:
    return load_main()


@pytest.fixture(scope="module")
def client(main: ModuleType, blip_dir: Path) -> Iterator[TestClient]:
    app = main.build_app(environ={"BLIP_MODEL_DIR": str(blip_dir), "BLIP_MAX_WAIT_MS": "1"})
    with ready_client(app) as test_client:
        yield test_client


def test_blip_tiny_model_round_trips_offline(tmp_path: Path) -> None:
    model, processor = build_tiny_blip(tmp_path / "model")
    loaded = BlipForConditionalGeneration.from_pretrained(tmp_path / "model", local_files_only=True).eval()
    loaded_processor = BlipProcessor.from_pretrained(tmp_path / "model", local_files_only=True)
    assert len(loaded_processor.tokenizer) == len(SPECIALS) + len(WORDS)
    assert loaded_processor.tokenizer.decode(loaded_processor.tokenizer("a cat on the sofa")["input_ids"],
                                             skip_special_tokens=True) == "a cat on the sofa"
    pixels = processor(images=[pil_image()], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        before = model.generate(pixel_values=pixels, max_new_tokens=6, num_beams=2)
        after = loaded.generate(pixel_values=pixels, max_new_tokens=6, num_beams=2)
    assert torch.equal(before, after)


def test_blip_tokenizer_vocab_file_keyword_is_the_known_trap(tmp_path: Path) -> None:
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(SPECIALS + WORDS) + "\n")
    assert len(BertTokenizer(vocab=str(vocab_file))) == len(SPECIALS) + len(WORDS)
    assert len(BertTokenizer(vocab_file=str(vocab_file))) == len(SPECIALS)  # silently ignored in transformers 5


def test_blip_ready_reports_fp32_on_cpu(client: TestClient, blip_dir: Path) -> None:
    info = client.get("/ready").json()
    assert info["model"]["backend"] == "blip" and info["model"]["dtype"] == "float32"
    assert info["model"]["device"] == "cpu" and info["model"]["name"] == blip_dir.name
    assert info["model"]["kind"] == "BlipForConditionalGeneration" and len(info["model"]["weights_sha256"]) == 64
    assert str(blip_dir.parent) not in json.dumps(info)  # the model folder's name, never its path
    assert info["model"]["vocab_size"] == len(SPECIALS) + len(WORDS) and info["limits"]["max_len_limit"] == 63


def test_blip_health_docs_and_page(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/predict", "/predicts", "/v1/caption"} <= set(paths) and "/captioned" not in paths  # fetching is off
    assert 'capture="environment"' in client.get("/").text


def test_blip_predict_and_predicts(client: TestClient) -> None:
    one = client.post("/predict?beam_size=3&num_captions=2&max_len=5", files={"file": ("a.png", PNG, "image/png")})
    many = client.post("/predicts?beam_size=3&num_captions=2&max_len=5",
                       files=[("files", ("a.png", PNG, "image/png")), ("files", ("b.jpg", image_bytes(fmt="JPEG"),
                                                                                "image/jpeg"))])
    assert one.status_code == 200 and many.status_code == 200
    body = one.json()
    assert len(body["captions"]) == 2 and body["caption"] == body["captions"][0]["caption"]
    assert all(1 <= len(c["caption"].split()) <= 5 and set(c["caption"].split()) <= set(WORDS)
               for c in body["captions"])
    assert [item["filename"] for item in many.json()] == ["a.png", "b.jpg"]
    batched = many.json()[0]["captions"]  # batched equals alone: the same captions, scores up to rounding
    assert [c["caption"] for c in batched] == [c["caption"] for c in body["captions"]]
    # a batch of two may run other kernels than one: the tiny BLIP (width 32, one layer each, a 768-term patch
    # embedding) is within the tiny end-to-end captioner's budget per log-prob, and a score has <= 5 of them
    assert_close_f32(torch.tensor([c["score"] for c in batched]), torch.tensor([c["score"] for c in body["captions"]]),
                     roundings=5 * TINY_E2E_ROUNDINGS)


def test_blip_v1_caption_raw_multipart_and_json(client: TestClient) -> None:
    parameters = {"num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 6, "repetition_penalty": 1.3,
                  "no_repeat_ngram_size": 2}
    as_json = client.post("/v1/caption", json={"inputs": base64.b64encode(PNG).decode(), "parameters": parameters})
    query = "&".join(f"{key}={value}" for key, value in parameters.items())
    raw = client.post(f"/v1/caption?{query}", content=PNG, headers={"content-type": "image/png"})
    form = client.post(f"/v1/caption?{query}", files={"file": ("a.png", PNG, "image/png")})
    assert as_json.status_code == 200, as_json.text
    assert as_json.json() == raw.json() == form.json() and len(as_json.json()) == 2
    assert all(isinstance(item["score"], float) for item in as_json.json())


def test_blip_generation_parameters_reach_generate(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = client.app.state.serving.backend
    seen: dict[str, Any] = {}
    original = backend.model.generate

    def spy(**kwargs: Any) -> Any:
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(backend.model, "generate", spy)
    answer = client.post("/predict?beam_size=4&num_captions=3&max_len=7&repetition_penalty=1.5&no_repeat_ngram_size=3",
                         files={"file": ("a.png", PNG, "image/png")})
    assert answer.status_code == 200 and len(answer.json()["captions"]) == 3
    assert {key: seen[key] for key in ("num_beams", "num_return_sequences", "max_new_tokens", "repetition_penalty",
                                       "no_repeat_ngram_size")} == {"num_beams": 4, "num_return_sequences": 3,
                                                                    "max_new_tokens": 7, "repetition_penalty": 1.5,
                                                                    "no_repeat_ngram_size": 3}
    assert seen["pixel_values"].dtype == torch.float32 and seen["pixel_values"].shape == (1, 3, 32, 32)


def test_blip_greedy_scores_are_mean_log_probabilities(client: TestClient) -> None:
    answer = client.post("/v1/caption?num_beams=1&max_new_tokens=5", content=PNG, headers={"content-type": "image/png"})
    assert answer.status_code == 200
    (item,) = answer.json()
    assert item["generated_text"] and -20.0 < item["score"] < 0.0


@pytest.mark.parametrize("body", [{"inputs": "aGk=", "parameters": {"temperature": 0.7}},
                                  {"inputs": base64.b64encode(PNG).decode(), "parameters": {"num_beams": 11}},
                                  {"inputs": base64.b64encode(PNG).decode(), "parameters": {"max_new_tokens": 64}},
                                  {"inputs": base64.b64encode(b"GIF89a").decode()}])
def test_blip_bad_requests_422(client: TestClient, body: dict) -> None:
    assert client.post("/v1/caption", json=body).status_code == 422


def test_blip_data_in_no_accepted_format_415(client: TestClient) -> None:
    answer = client.post("/v1/caption", json={"inputs": base64.b64encode(b"not an image").decode()})
    assert answer.status_code == 415 and "accepted formats" in answer.json()["detail"]


def test_blip_captioned_disabled_by_default_403(client: TestClient) -> None:
    answer = client.post("/captioned", json={"imageUrl": "https://example.com/cat.jpg", "imageName": "cat"})
    assert answer.status_code == 403 and "BLIP_URL_FETCH" in answer.json()["detail"]


def test_blip_bf16_model_gets_bf16_pixel_values(main: ModuleType, blip_dir: Path) -> None:
    backend = main.BlipBackend.load({"MODEL_DIR": str(blip_dir), "DEVICE": "cpu", "PRECISION": "bf16"})
    params = main.CaptionParams(beam_size=2, max_len=4, num_captions=2)
    captions = backend.caption_batch([pil_image(), pil_image()], params)
    assert backend.dtype == torch.bfloat16 and next(backend.model.parameters()).dtype == torch.bfloat16
    assert [len(c) for c in captions] == [2, 2] and all(isinstance(s, float) for _, s in captions[0])


def test_blip_prompt_prefixes_captions(main: ModuleType, blip_dir: Path) -> None:
    backend = main.BlipBackend.load({"MODEL_DIR": str(blip_dir), "PROMPT": "a picture of"})
    captions = backend.caption_batch([pil_image()], main.CaptionParams(beam_size=1, max_len=4))
    assert captions[0][0][0].startswith("a picture of ")


def test_blip_startup_fails_clearly_without_model_dir(main: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="BLIP_MODEL_DIR is not set"), TestClient(main.build_app(environ={})):
        pass
    empty = main.build_app(environ={"BLIP_MODEL_DIR": str(tmp_path)})
    with pytest.raises(RuntimeError, match="no config.json"), TestClient(empty):
        pass


def _pins(path: Path) -> dict[str, str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {m.group(1).lower(): m.group(2) for line in lines if (m := re.fullmatch(r"([\w.-]+)==([\w.]+)", line))}


def test_blip_requirements_pin_the_root_versions() -> None:
    blip, root = _pins(BLIP_DIR / "requirements.txt"), _pins(ROOT / "requirements.txt")
    assert {"fastapi", "uvicorn", "python-multipart", "transformers", "torch", "pillow", "numpy"} <= set(blip)
    assert {name: version for name, version in blip.items() if root.get(name) != version} == {}


@pytest.mark.slow
def test_blip_uvicorn_serves_from_its_folder(blip_dir: Path) -> None:
    env = {"BLIP_MODEL_DIR": str(blip_dir)}
    log = ROOT / "test-artifacts" / "blip_server.log"
    with uvicorn_server("main:app", env, log, app_dir=BLIP_DIR, cwd=BLIP_DIR) as server, server.client(timeout=60) as c:
        assert c.get("/ready").json()["model"]["backend"] == "blip"
        answer = c.post("/predict", files={"file": ("a.png", PNG, "image/png")})
    assert answer.status_code == 200 and answer.json()["caption"]
