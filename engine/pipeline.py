"""The recipe as a declarative table of phases, run phase by phase with a manifest that makes it resumable.

Each phase is one command of the README (backbone.py pretrain, data_generator.py or train.py) run as a subprocess in
its own folder of the run directory. A phase's row says which script it runs, which earlier outputs it reads and
through which flag, and what it writes; a preset gives the settings. The manifest (pipeline.json) records each
phase's command, status, outputs, metrics and duration as it runs, so a finished phase is skipped and an interrupted
one resumes (every script continues where it stopped). A finished phase asked to run with another command is refused
with the differences listed, before anything runs, unless the run is told to rerun it (and what reads it).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.checkpoints import best_or_last
from utils.files import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
INITIAL_BACKBONE = 0  # phase 0's output, or the backbone file the user gives when a preset has no phase 0


@dataclass(frozen=True)
class Phase:
    """One row of the recipe."""

    number: int
    folder: str
    title: str
    command: tuple[str, ...]  # script (and sub-command) under the repository root
    reads: Mapping[str, int] = field(default_factory=dict)  # flag -> the phase whose output it takes
    fixed: Mapping[str, Any] = field(default_factory=dict)  # settings every run of this phase has
    writes: str = ""  # the output file in the phase folder; "" for training (best.pth, else the last checkpoint)

    @property
    def trains(self) -> bool:
        return self.command[0] == "train.py"

    def output(self, run_dir: Path) -> Path:
        folder = run_dir / self.folder
        return folder / self.writes if self.writes else best_or_last(folder)

    def output_flag(self, run_dir: Path) -> list[str]:
        """Where the phase is told to write."""
        if self.trains:
            return ["--save_path", str(run_dir), "--run_name", self.folder]
        return ["--output_path", str(run_dir / self.folder / self.writes)]


RECIPE: tuple[Phase, ...] = (
    Phase(0, "phase0-backbone", "backbone pretraining on the dataset's own labels", ("backbone.py", "pretrain"),
          writes="backbone.pth"),
    Phase(1, "phase1-features", "features from the initial backbone", ("data_generator.py",),
          reads={"backbone": INITIAL_BACKBONE}, writes="features.hdf5"),
    Phase(2, "phase2-xe-features", "cross-entropy on cached features", ("train.py",), reads={"features_path": 1},
          fixed={"reinforce": False, "is_end_to_end": False}),
    Phase(3, "phase3-xe-e2e", "cross-entropy end-to-end", ("train.py",),
          reads={"backbone": INITIAL_BACKBONE, "body_save_path": 2},
          fixed={"reinforce": False, "is_end_to_end": True, "partial_load": True}),
    Phase(4, "phase4-features", "features from the phase-3 backbone", ("data_generator.py",), reads={"backbone": 3},
          writes="features.hdf5"),
    Phase(5, "phase5-scst-features", "self-critical CIDEr-D on cached features", ("train.py",),
          reads={"features_path": 4, "body_save_path": 3},
          fixed={"reinforce": True, "is_end_to_end": False, "partial_load": True}),
    Phase(6, "phase6-scst-e2e", "self-critical CIDEr-D end-to-end", ("train.py",),
          reads={"backbone": 3, "body_save_path": 5},
          fixed={"reinforce": True, "is_end_to_end": True, "partial_load": True}),
)


@dataclass(frozen=True)
class Recipe:
    """What one pipeline run does: the data, the initial backbone (None when phase 0 makes it), each phase's
    settings (flag name -> value; a phase without settings is not part of the recipe), and in a sentence what the
    run starts from."""

    images_path: Path
    captions_path: Path
    backbone: Path | None
    settings: Mapping[int, Mapping[str, Any]]
    start: str = ""

    def phases(self) -> list[Phase]:
        return [p for p in RECIPE if p.number in self.settings]

    def command(self, phase: Phase, run_dir: Path, outputs: Mapping[int, Path]) -> list[str]:
        """The phase's command line (script and arguments) given the earlier phases' outputs."""
        reads = {flag: outputs[source] for flag, source in phase.reads.items()}
        data = {"images_path": self.images_path, "captions_path": self.captions_path}
        return [*phase.command, *phase.output_flag(run_dir),
                *as_argv({**data, **phase.fixed, **reads, **self.settings[phase.number]})]

    def initial_outputs(self) -> dict[int, Path]:
        """Outputs known before any phase runs: the given backbone stands for phase 0 when the recipe has none."""
        return {INITIAL_BACKBONE: self.backbone} if self.backbone is not None and 0 not in self.settings else {}


def as_argv(settings: Mapping[str, Any]) -> list[str]:
    """{flag: value} -> ['--flag', 'value', ...]: booleans as True/False, tuples as [a,b] (the seed's spelling)."""
    argv: list[str] = []
    for key, value in settings.items():
        if isinstance(value, tuple):
            value = "[" + ",".join(str(v) for v in value) + "]"
        argv += [f"--{key}", str(value)]
    return argv


def parse_phases(spec: str) -> list[int]:
    """'0-6', '2-5', '3', '2,4,5' -> sorted phase numbers."""
    out: set[int] = set()
    try:
        for part in (p.strip() for p in spec.split(",")):
            if "-" in part:
                a, b = part.split("-", 1)
                out.update(range(int(a), int(b) + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        out = set()
    if not out or not out <= set(range(0, 7)):
        raise ValueError(f"--phases {spec!r}: phases are numbered 0 to 6 (e.g. 1-6, 2-5, 3)")
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
        atomic_write_json(self.path, self.data, indent=1)


class ChangedPhasesError(ValueError):
    """Finished phases whose new command differs from the one they ran with (refused unless rerun is asked)."""


def command_differences(old: Sequence[str], new: Sequence[str]) -> list[str]:
    """'--flag: old -> new' (or 'added' / 'dropped') between two phase commands of the form [script, (sub-command,)
    --flag value ...]."""

    def flags(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        head = [a for a in argv[:2] if not a.startswith("--")]
        rest = list(argv[len(head):])
        return head, {rest[i]: rest[i + 1] if i + 1 < len(rest) else "" for i in range(0, len(rest), 2)}

    (old_head, a), (new_head, b) = flags(old), flags(new)
    out = [f"command: {' '.join(old_head)} -> {' '.join(new_head)}"] if old_head != new_head else []
    for flag in [*a, *(f for f in b if f not in a)]:
        if flag not in b:
            out.append(f"{flag} {a[flag]} dropped")
        elif flag not in a:
            out.append(f"{flag} {b[flag]} added")
        elif a[flag] != b[flag]:
            out.append(f"{flag}: {a[flag]} -> {b[flag]}")
    return out


def recorded_argv(record: Mapping[str, Any]) -> list[str]:
    """The command a phase ran with, without 'python' (manifests before 'argv' was kept give only the text)."""
    if "argv" in record:
        return list(record["argv"])
    return shlex.split(record.get("command", ""))[1:]


def plan_phases(run_dir: Path, recipe: Recipe, selected: list[int], manifest: Manifest,
                rerun_changed: bool = False) -> dict[int, list[str]]:
    """Which selected phases must run again although they started or finished before, with the reasons: their
    command differs from the recorded one, or a phase they read runs again. Raises ChangedPhasesError listing them
    all when rerun_changed is False; nothing has run or been written then."""
    outputs = recipe.initial_outputs()
    again: dict[int, list[str]] = {}
    for phase in recipe.phases():
        out = phase.output(run_dir)
        record = manifest.data["phases"].get(str(phase.number), {})
        if phase.number not in selected or not record.get("status"):
            if out.exists() or phase.number in selected:
                outputs[phase.number] = out
            continue
        if any(n not in outputs for n in phase.reads.values()):
            continue  # run_phases says which input is missing
        reasons = command_differences(recorded_argv(record), recipe.command(phase, run_dir, outputs))
        reasons += [f"reads phase {n}, which runs again" for n in sorted(set(phase.reads.values())) if n in again]
        if reasons:
            again[phase.number] = reasons
        outputs[phase.number] = out
    if again and not rerun_changed:
        listed = "\n".join(f"  phase {n} ({manifest.data['phases'][str(n)].get('status')}): {'; '.join(r)}"
                            for n, r in again.items())
        raise ChangedPhasesError(f"{run_dir} holds phases that ran with other settings than this command gives:\n"
                                 f"{listed}\nnothing was run. Rerun those phases (their folders are kept under "
                                 f"{run_dir / 'replaced'}) with --rerun_changed True, or use another --run_dir")
    return again


def run_phases(run_dir: Path, recipe: Recipe, selected: list[int], manifest: Manifest,
               env: dict[str, str] | None = None, again: Mapping[int, list[str]] | None = None,
               overrides: Sequence[str] = ()) -> dict[int, Path]:
    """Run the selected phases in order, skipping finished ones and moving aside those planned to run again
    (plan_phases); returns every known phase output. Each phase record keeps the overrides it ran with."""
    outputs = recipe.initial_outputs()
    again = again or {}
    for phase in recipe.phases():
        out = phase.output(run_dir)
        if phase.number not in selected:
            if out.exists():
                outputs[phase.number] = out
            continue
        missing = sorted(n for n in set(phase.reads.values()) if n not in outputs)
        if missing:
            raise FileNotFoundError(f"phase {phase.number} needs the output of phase(s) {missing}, which do not "
                                    f"exist in {run_dir}; run them first (e.g. --phases {missing[0]}-{phase.number})")
        record = manifest.phase(phase.number)
        if phase.number in again:
            _move_aside(run_dir, phase, record)
        elif record.get("status") == "done" and out.exists():
            print(f"== phase {phase.number} ({phase.title}): already done, skipping", flush=True)
            outputs[phase.number] = out
            continue
        record["overrides"] = list(overrides)
        run_phase(phase, recipe.command(phase, run_dir, outputs), run_dir, record, manifest, env)
        outputs[phase.number] = phase.output(run_dir)
        record["output"] = str(outputs[phase.number])
        manifest.save()
    return outputs


def _move_aside(run_dir: Path, phase: Phase, record: dict[str, Any]) -> None:
    """Keep an earlier run of a phase under run_dir/replaced/ and forget its record, so the phase starts afresh."""
    folder = run_dir / phase.folder
    if folder.exists():
        stamp = time.strftime('%Y%m%d-%H%M%S')
        target = run_dir / "replaced" / f"{phase.folder}-{stamp}"
        for k in range(2, 100):
            if not target.exists():
                break
            target = run_dir / "replaced" / f"{phase.folder}-{stamp}.{k}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder, target)
        print(f"== phase {phase.number}: its earlier run (other settings) moved to {target}", flush=True)
    record.clear()


def run_phase(phase: Phase, command: list[str], run_dir: Path, record: dict[str, Any], manifest: Manifest,
              env: dict[str, str] | None) -> None:
    """One phase as a subprocess, its progress recorded in the manifest; a failure raises with what to do."""
    print(f"== phase {phase.number} ({phase.title})\n   {' '.join(command)}", flush=True)
    (run_dir / phase.folder).mkdir(parents=True, exist_ok=True)
    record.update({"title": phase.title, "command": " ".join(["python", *command]), "argv": list(command),
                   "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    manifest.save()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / command[0]), *command[1:]], cwd=ROOT,
                          env={**os.environ, **(env or {})})
    record["duration_s"] = round(record.get("duration_s", 0) + time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        record.update({"status": "failed", "returncode": proc.returncode})
        manifest.save()
        raise RuntimeError(f"phase {phase.number} failed (exit code {proc.returncode}); fix the problem and run the "
                           "same command again: finished phases are skipped and this one resumes")
    record.update({"status": "done", "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "metrics": phase_metrics(run_dir / phase.folder)})


def phase_metrics(folder: Path) -> dict[str, Any]:
    """The last training summary, and the best validation CIDEr-D (train.py) or the last probe (phase 0) a phase
    logged (empty otherwise)."""
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
    probes = [r for r in rows if r["type"] == "probe"]
    if probes:
        out["probe"] = {k: v for k, v in probes[-1].items() if k not in ("type", "phase", "time", "epoch", "it")}
    return out
