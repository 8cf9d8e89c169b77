"""The six-phase recipe as a declarative table, run phase by phase with a manifest that makes it resumable.

Each phase is one command of the README (data_generator.py or train.py) run as a subprocess in its own folder of the
run directory; the manifest records its command, inputs, outputs, metrics and duration, so a finished phase is
skipped and an interrupted one resumes (both scripts continue where they stopped).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Phase:
    """One row of the recipe: which script, which folder, and its arguments given the earlier phases' outputs."""

    number: int
    folder: str
    script: str
    title: str
    args: Callable[[dict[int, Path]], list[str]]
    output: Callable[[Path], Path]


@dataclass
class RecipeInputs:
    """What the user provides (or the quickstart generates): data, the initial backbone, and per-preset settings."""

    images_path: Path
    captions_path: Path
    backbone: Path
    model_args: list[str] = field(default_factory=list)
    phase_args: dict[int, list[str]] = field(default_factory=dict)
    common_args: list[str] = field(default_factory=list)


def best_or_last(folder: Path) -> Path:
    """The checkpoint a later phase should start from: best.pth by val CIDEr-D, else the newest rolling file."""
    best = folder / "best.pth"
    if best.exists():
        return best
    files = sorted(folder.glob("ckpt_e*_it*.pth"))
    return files[-1] if files else best


def recipe(run_dir: Path, inp: RecipeInputs) -> list[Phase]:
    """Phases 1-6: features, XE on features, XE end-to-end, features again, SCST on features, SCST end-to-end."""
    data = ["--images_path", str(inp.images_path), "--captions_path", str(inp.captions_path)]

    def train(number: int, folder: str, reinforce: bool, e2e: bool, extra: Callable[[dict[int, Path]], list[str]]):
        def args(out: dict[int, Path]) -> list[str]:
            a = ["--save_path", str(run_dir), "--run_name", folder, "--reinforce", str(reinforce),
                 "--is_end_to_end", str(e2e), *data, *inp.model_args, *inp.common_args, *extra(out),
                 *inp.phase_args.get(number, [])]
            return a
        return args

    def generator(source: Callable[[dict[int, Path]], Path], folder: str):
        return lambda out: ["--save_model_path", str(source(out)), "--output_path",
                            str(run_dir / folder / "features.hdf5"), *data, *inp.phase_args.get(
                                1 if folder.startswith("phase1") else 4, [])]

    return [
        Phase(1, "phase1-features", "data_generator.py", "features from the initial backbone",
              generator(lambda out: inp.backbone, "phase1-features"), lambda d: d / "features.hdf5"),
        Phase(2, "phase2-xe-features", "train.py", "cross-entropy on cached features",
              train(2, "phase2-xe-features", False, False, lambda out: ["--features_path", str(out[1])]),
              best_or_last),
        Phase(3, "phase3-xe-e2e", "train.py", "cross-entropy end-to-end",
              train(3, "phase3-xe-e2e", False, True, lambda out: [
                  "--backbone_save_path", str(inp.backbone), "--body_save_path", str(out[2]),
                  "--partial_load", "True"]), best_or_last),
        Phase(4, "phase4-features", "data_generator.py", "features from the phase-3 backbone",
              generator(lambda out: out[3], "phase4-features"), lambda d: d / "features.hdf5"),
        Phase(5, "phase5-scst-features", "train.py", "self-critical CIDEr-D on cached features",
              train(5, "phase5-scst-features", True, False, lambda out: [
                  "--features_path", str(out[4]), "--body_save_path", str(out[3]), "--partial_load", "True"]),
              best_or_last),
        Phase(6, "phase6-scst-e2e", "train.py", "self-critical CIDEr-D end-to-end",
              train(6, "phase6-scst-e2e", True, True, lambda out: [
                  "--backbone_save_path", str(out[3]), "--body_save_path", str(out[5]), "--partial_load", "True"]),
              best_or_last),
    ]


def parse_phases(spec: str) -> list[int]:
    """'1-6', '2-5', '3', '2,4,5' -> sorted phase numbers."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.update(range(int(a), int(b) + 1))
        else:
            out.add(int(part))
    if not out or not out <= set(range(1, 7)):
        raise ValueError(f"--phases {spec!r}: phases are numbered 1 to 6 (e.g. 1-6, 2-5, 3)")
    return sorted(out)


class Manifest:
    """run_dir/pipeline.json: per phase its command, status, outputs, metrics and duration; rewritten atomically."""

    def __init__(self, path: Path, preset: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"preset": preset, "phases": {}}
        if path.exists():
            self.data = json.loads(path.read_text())
            if self.data.get("preset") != preset:
                raise ValueError(f"{path.parent} holds a pipeline run of preset {self.data.get('preset')!r}, not "
                                 f"{preset!r}: use another --run_dir")

    def phase(self, number: int) -> dict[str, Any]:
        return self.data["phases"].setdefault(str(number), {})

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def run_phases(run_dir: Path, phases: list[Phase], selected: list[int], manifest: Manifest,
               env: dict[str, str] | None = None) -> dict[int, Path]:
    """Run the selected phases in order, skipping finished ones; returns every known phase output."""
    outputs: dict[int, Path] = {}
    for ph in phases:
        out = ph.output(run_dir / ph.folder)
        record = manifest.phase(ph.number)
        if ph.number not in selected:
            if out.exists():
                outputs[ph.number] = out
            continue
        missing = [n for n in range(1, ph.number) if n not in outputs and _needs(ph, n)]
        if missing:
            raise FileNotFoundError(f"phase {ph.number} needs the output of phase(s) {missing}, which do not exist "
                                    f"in {run_dir}; run them first (e.g. --phases {missing[0]}-{ph.number})")
        if record.get("status") == "done" and out.exists():
            print(f"== phase {ph.number} ({ph.title}): already done, skipping", flush=True)
            outputs[ph.number] = out
            continue
        cmd = [sys.executable, str(ROOT / ph.script), *ph.args(outputs)]
        print(f"== phase {ph.number} ({ph.title})\n   {' '.join(cmd[1:])}", flush=True)
        (run_dir / ph.folder).mkdir(parents=True, exist_ok=True)
        record.update({"title": ph.title, "command": " ".join(["python", *cmd[1:]]), "status": "running",
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        manifest.save()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})})
        duration = time.perf_counter() - t0
        if proc.returncode != 0:
            record.update({"status": "failed", "returncode": proc.returncode,
                           "duration_s": round(record.get("duration_s", 0) + duration, 1)})
            manifest.save()
            raise RuntimeError(f"phase {ph.number} failed (exit code {proc.returncode}); fix the problem and run the "
                               "same command again: finished phases are skipped and this one resumes")
        record.update({"status": "done", "output": str(out),
                       "duration_s": round(record.get("duration_s", 0) + duration, 1),
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "metrics": phase_metrics(run_dir / ph.folder)})
        manifest.save()
        outputs[ph.number] = out
    return outputs


PHASE_INPUTS = {2: {1}, 3: {2}, 4: {3}, 5: {3, 4}, 6: {3, 5}}  # which earlier outputs each phase reads


def _needs(ph: Phase, n: int) -> bool:
    return n in PHASE_INPUTS.get(ph.number, set())


def phase_metrics(folder: Path) -> dict[str, Any]:
    """The last training summary and the best validation CIDEr-D logged by a train.py phase (empty otherwise)."""
    log = folder / "metrics.jsonl"
    if not log.exists():
        return {}
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["type"] == "train"]
    val = [r for r in rows if r["type"] == "val"]
    out: dict[str, Any] = {}
    if train:
        out["last_train"] = {k: v for k, v in train[-1].items() if isinstance(v, (int, float)) and k != "time"}
    if val:
        out["best_val_cider"] = max(r["cider"] for r in val)
        out["val_curve"] = [(r["it"], r["cider"]) for r in val]
    return out
