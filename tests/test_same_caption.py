"""The same caption everywhere (issue 22): one tiny end-to-end checkpoint, one photograph, every setting left at its
default: demo.py, test.py's predictions, the Python API and POST /predict give the same caption."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image
from processes import run_watched

import api
from captioner import load_captioner
from serving.testing import ready_client

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PHOTO = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"


def test_demo_test_python_api_and_http_api_give_the_same_caption_by_default(tiny_checkpoint: Path,
                                                                             tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = folder / "hopper.jpg"
    Image.open(PHOTO).convert("RGB").resize((160, 200)).save(photo)
    demo = run_watched([sys.executable, "demo.py", "--checkpoint", str(tiny_checkpoint), "--image_paths", str(photo),
                        "--json"], cwd=ROOT)
    assert demo.returncode == 0, demo.stderr
    evaluation = run_watched([sys.executable, "test.py", "--checkpoint", str(tiny_checkpoint), "--images_path",
                              str(folder), "--predictions_only", "True", "--output_dir", str(tmp_path / "eval")],
                             cwd=ROOT)
    assert evaluation.returncode == 0, evaluation.stderr
    with ready_client(api.build_app(environ={"CAPTION_CHECKPOINT": str(tiny_checkpoint)})) as client:
        answer = client.post("/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
    assert answer.status_code == 200, answer.text
    captions = {
        "demo.py": json.loads(demo.stdout.splitlines()[-1])["captions"][0]["caption"],
        "test.py": json.loads((tmp_path / "eval" / "predictions_test_beam5.json").read_text())[0]["caption"],
        "Python API": load_captioner(tiny_checkpoint).caption(photo)[0].text,
        "POST /predict": answer.json()["caption"],
    }
    assert len(set(captions.values())) == 1, captions
    assert len(captions["demo.py"].split()) > 20  # the model's full length (23 tokens), not the API's former cap 20
