"""The GPU check's report: merges what benchmarks/gpu_check.sh left in OUT_DIR into one JSON and the rows of
docs/benchmarks.md, each figure beside its goal.

    python benchmarks/gpu_report.py OUT_DIR                       # OUT_DIR/gpu_check.json, OUT_DIR/benchmarks_rows.md
    python benchmarks/gpu_report.py OUT_DIR --environment cuda    # OUT_DIR/environment.json; exit 1 without CUDA

OUT_DIR holds stages.tsv (one line per stage: name, status, exit code, seconds, detail, command), each benchmark's
--json file (decoding.json, train_features.json, train_e2e.json, data.json, serving.json), the CUDA tests' JUnit
file (gpu_tests.xml) and environment.json. The merge needs nothing but the standard library.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from string import Formatter
from typing import Any

# the reference code on one H200 (shared/reference/anchors.md: random weights, synthetic inputs, fp32 as shipped)
REFERENCE_XE_IMG_S = 914.0  # XE step on cached features, batch 48
REFERENCE_SCST_IMG_S = 49.4  # SCST step on cached features, batch 24 x 5 samples, reward excluded
REFERENCE_E2E_XE_IMG_S = 48.8  # end-to-end XE step (Swin-L), batch 16, 21.0 GiB

# gpu_check.sh's stages, in the order it runs them, with what each measures
STAGES: dict[str, str] = {
    "environment": "device, driver and versions (environment.json)",
    "gpu_tests": "the CUDA-marked tests (pytest -m gpu tests/test_gpu_paths.py)",
    "decoding": "end-to-end captioning of the seed model against the backbone alone (bench_decoding.py)",
    "train_features": "XE and SCST steps on cached features (bench_train_step.py)",
    "train_e2e": "end-to-end XE step with peak memory (bench_train_step.py)",
    "data": "feature generation (bench_data.py)",
    "serving": "the HTTP API under 16 concurrent clients (bench_serving.py)",
}
STAGE_FILES = {"decoding": "decoding.json", "train_features": "train_features.json", "train_e2e": "train_e2e.json",
               "data": "data.json", "serving": "serving.json"}
STATUSES = ("ok", "failed", "skipped")


@dataclass(frozen=True)
class Figure:
    """One row of the report: where its value sits in a stage's output, its unit and its goal (value >= goal)."""

    stage: str
    label: str  # formatted with the values beside the figure (batch, precision, ...)
    path: tuple[str, ...]  # keys into the stage's JSON
    unit: str
    goal: float | None = None
    goal_text: str = ""
    context: str = ""  # a reference figure to read it against, when there is no goal
    scale: float = 1.0
    digits: int = 1


FIGURES: list[Figure] = [
    Figure("decoding", "end-to-end captioning, seed model, batch {batch}, beam {beam}, {max_len} tokens, "
           "{img_size} px, {precision}, {compiled}",
           ("figures", "end_to_end", "optimizer_expansionnet", "caption_img_s"), "img/s", goal=400.0,
           goal_text=">= 400 img/s", context="reference code: 65.8 img/s (Swin-L, batch 16, fp32)"),
    Figure("decoding", "backbone alone (the ceiling), {backbone}, batch {batch}, {img_size} px, {precision}, "
           "{compiled}", ("figures", "end_to_end", "optimizer_expansionnet", "backbone_img_s"), "img/s",
           context="timm SwinV2-B measured alone: torch.compile bf16 531 img/s, eager bf16 297 img/s"),
    Figure("decoding", "captioning's share of the backbone ceiling",
           ("figures", "end_to_end", "optimizer_expansionnet", "share_of_ceiling"), "%", scale=100.0, digits=0),
    Figure("train_features", "XE step on cached features, batch {batch}, {precision}, {compiled}",
           ("figures", "xe", "ours_img_s"), "img/s", goal=3 * REFERENCE_XE_IMG_S,
           goal_text=f">= 3x the reference's {REFERENCE_XE_IMG_S:.0f} img/s = {3 * REFERENCE_XE_IMG_S:.0f} img/s"),
    Figure("train_features", "XE step, reference-style (fp32, per-parameter RAdam), same run, batch {batch}",
           ("figures", "xe", "reference_style_img_s"), "img/s",
           context=f"reference code: {REFERENCE_XE_IMG_S:.0f} img/s"),
    Figure("train_features", "SCST step on cached features, batch {batch} x {samples} samples, reward included, "
           "{precision}, {compiled}", ("figures", "scst", "ours_img_s"), "img/s", goal=10 * REFERENCE_SCST_IMG_S,
           goal_text=f">= 10x the reference's {REFERENCE_SCST_IMG_S:g} img/s = {10 * REFERENCE_SCST_IMG_S:.0f} img/s"),
    Figure("train_features", "SCST step, reference formulation (prefix recomputed with gradient), same run",
           ("figures", "scst", "reference_formulation_img_s"), "img/s",
           context=f"reference code: {REFERENCE_SCST_IMG_S:g} img/s (reward excluded)"),
    Figure("train_e2e", "end-to-end XE step, captions grouped by image, {backbone} at {img_size} px, batch {batch} x "
           "{captions_per_image} captions, {precision}", ("figures", "e2e_xe", "grouped_img_s"), "img/s",
           context=f"reference code: {REFERENCE_E2E_XE_IMG_S:g} img/s (Swin-L, batch 16, one caption per image)"),
    Figure("train_e2e", "end-to-end XE step, caption-wise (backbone once per caption), batch {batch}",
           ("figures", "e2e_xe", "caption_wise_pairs_s"), "img/s"),
    Figure("train_e2e", "end-to-end XE step, peak GPU memory, batch {batch}", ("figures", "e2e_xe", "peak_gib"),
           "GiB", context="reference code: 21.0 GiB (Swin-L, batch 16)"),
    Figure("data", "feature generation, {backbone} at {img_size} px, batch {batch}, {precision}",
           ("figures", "generation", "img_s"), "img/s"),
    Figure("serving", "HTTP API under concurrent clients, {concurrency} clients, {img_size} px model, beam "
           "{beam_size}, server on {device}, {precision}", ("this checkout", "concurrent", "requests_per_s"),
           "requests/s"),
    Figure("serving", "HTTP API, one request at a time", ("this checkout", "sequential", "requests_per_s"),
           "requests/s"),
    Figure("serving", "HTTP API, p95 latency under concurrent clients, {concurrency} clients",
           ("this checkout", "concurrent", "p95_ms"), "ms", digits=0),
    Figure("serving", "HTTP API, concurrent clients against one at a time, {concurrency} clients",
           ("this checkout", "throughput_ratio"), "x", goal=2.0, goal_text=">= 2x", digits=2),
]


# ------------------------------------------------------------------------------------------------------ reading
def read_stages(out: Path) -> dict[str, dict[str, Any]]:
    """stages.tsv -> {name: {status, exit_code, seconds, detail, command}}; every known stage present (a stage without
    a line did not run: the script was stopped before it)."""
    found: dict[str, dict[str, Any]] = {}
    path = out / "stages.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        if not line.strip():
            continue
        name, status, code, seconds, detail, command = (line.split("\t") + [""] * 6)[:6]
        found[name] = {"status": status if status in STATUSES else "failed", "detail": detail,
                       "exit_code": int(code) if code.lstrip("-").isdigit() else None,
                       "seconds": float(seconds) if _is_number(seconds) else None, "command": command,
                       "log": f"{name}.log" if (out / f"{name}.log").exists() else None}
    stages = {name: found.pop(name, {"status": "failed", "detail": "not run: no record in stages.tsv (the script "
                                     "was stopped before this stage)", "exit_code": None, "seconds": None,
                                     "command": "", "log": None})
              for name in STAGES}
    stages.update(found)  # stages this report does not know, kept as recorded
    return stages


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_junit(path: Path) -> dict[str, Any] | None:
    """Counts and failed test names of a pytest JUnit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname', '')}::{case.get('name', '')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed_tests": failed}


def _command(stage: dict[str, Any]) -> str:
    """A stage's command as a reader would type it: without the check's own --json / --junitxml output."""
    words = str(stage.get("command") or "").split()
    kept = [w for i, w in enumerate(words) if w not in ("--json", "--junitxml")
            and (i == 0 or words[i - 1] not in ("--json", "--junitxml"))]
    return " ".join(kept)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _get(record: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


# ------------------------------------------------------------------------------------------------------ merging
def figure_row(fig: Figure, record: dict[str, Any] | None, stage: dict[str, Any]) -> dict[str, Any]:
    """One figure: its value (None when its stage did not produce it), goal and whether it is met."""
    value = _get(record, fig.path)
    beside = dict(_get(record, ("settings",)) or {})
    beside.update(_get(record, ("config",)) or {})  # bench_serving's settings
    beside.update(_get(record, fig.path[:-1]) or {})
    if "compile" in beside:
        beside["compiled"] = "compiled" if beside["compile"] else "eager"
    label = _label(fig.label, beside)
    number = float(value) * fig.scale if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    met = None if fig.goal is None or number is None else number >= fig.goal
    note = ""
    if number is None and stage["status"] == "ok":
        note = "not in the stage's output" + (" (GPU only)" if fig.unit == "GiB" else "")
    elif number is None:
        note = f"stage {stage['status']}" + (f": {stage['detail']}" if stage.get("detail") else "")
    elif stage["status"] != "ok":
        note = f"measured before the stage {stage['status']}" + (f" ({stage['detail']})" if stage.get("detail")
                                                                 else "")
    return {"stage": fig.stage, "figure": label, "value": None if number is None else round(number, 4),
            "unit": fig.unit, "digits": fig.digits, "goal": fig.goal, "goal_text": fig.goal_text, "met": met,
            "context": fig.context, "note": note, "command": _command(stage)}


def _label(template: str, values: dict[str, Any]) -> str:
    """The template's comma-separated parts filled from values; a part naming a value not there is left out."""
    parts = []
    for part in template.split(", "):
        fields = [f for _, f, _, _ in Formatter().parse(part) if f]
        if all(f in values for f in fields):
            parts.append(part.format_map(values))
    return ", ".join(parts)


def tests_row(junit: dict[str, Any] | None, stage: dict[str, Any]) -> dict[str, Any]:
    """The CUDA tests as a figure: passed out of collected; the goal is all of them passed (none skipped)."""
    if junit is None:
        note = f"no test results: stage {stage['status']}" + (f" ({stage['detail']})" if stage.get("detail") else "")
        return {"stage": "gpu_tests", "figure": "CUDA-marked tests (pytest -m gpu)", "value": None, "unit": "passed",
                "digits": 0, "goal": None, "goal_text": "all pass", "met": None, "context": "", "note": note,
                "command": _command(stage)}
    total = junit["tests"]
    note = ", ".join(f"{junit[k]} {k}" for k in ("failures", "errors", "skipped") if junit[k])
    if junit["failed_tests"]:
        note += ": " + ", ".join(junit["failed_tests"])
    if stage.get("detail"):
        note = f"{note}; {stage['detail']}" if note else stage["detail"]
    return {"stage": "gpu_tests", "figure": "CUDA-marked tests (pytest -m gpu)", "value": junit["passed"],
            "unit": f"of {total} passed", "digits": 0, "goal": float(total), "goal_text": "all pass",
            "met": total > 0 and junit["passed"] == total, "context": "", "note": note,
            "command": _command(stage), "tests": junit}


def merge(out: Path) -> dict[str, Any]:
    """Everything of one GPU check in one record."""
    stages = read_stages(out)
    env = read_json(out / "environment.json") or {}
    figures = [tests_row(read_junit(out / "gpu_tests.xml"), stages["gpu_tests"])]
    records = {name: read_json(out / file) for name, file in STAGE_FILES.items()}
    for fig in FIGURES:
        figures.append(figure_row(fig, records.get(fig.stage), stages[fig.stage]))
    if not env:  # the environment of the first benchmark that recorded one
        env = next((r["environment"] for r in records.values() if r and isinstance(r.get("environment"), dict)), {})
    with_goal = [f for f in figures if f["goal_text"]]
    failed = [name for name, s in stages.items() if s["status"] == "failed"]
    return {
        "date": env.get("date") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dry_run": bool(env.get("dry_run")),
        "device": env.get("device_name") or env.get("device") or "unknown",
        "versions": {k: env.get(k) for k in ("python", "torch", "cuda", "timm", "torchvision", "triton", "h5py",
                                             "numpy", "pytest", "fastapi", "uvicorn") if k in env},
        "environment": env,
        "stages": stages,
        "figures": figures,
        "goals": {"met": sum(f["met"] is True for f in with_goal), "not_met": sum(f["met"] is False for f in with_goal),
                  "not_measured": sum(f["met"] is None for f in with_goal)},
        "failed_stages": failed,
        "ok": not failed,
    }


# ------------------------------------------------------------------------------------------------------ writing
def _value_text(row: dict[str, Any]) -> str:
    if row["value"] is None:
        return "not measured"
    return f"{row['value']:.{row['digits']}f} {row['unit']}"


def _goal_text(row: dict[str, Any]) -> str:
    if not row["goal_text"]:
        return row["context"] or ""
    verdict = {True: "**met**", False: "**not met**", None: "not measured"}[row["met"]]
    return f"{row['goal_text']}: {verdict}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def rows_markdown(report: dict[str, Any]) -> str:
    """Markdown table rows in docs/benchmarks.md's style: figure, value, goal, command, device, date; then one line
    per stage that did not pass."""
    date = str(report["date"])[:10]
    lines = []
    if report["dry_run"]:
        lines.append("Dry run (GPU_CHECK_DRY_RUN=1: CPU, tiny sizes): the figures check the script, they measure "
                     "nothing.\n")
    lines += ["| figure | value | goal | command | device | date |", "|---|---|---|---|---|---|"]
    for row in report["figures"]:
        value = _value_text(row) + (f" ({row['note']})" if row["note"] else "")
        command = f"`{row['command']}`" if row["command"] else ""
        lines.append("| " + " | ".join(_cell(c) for c in (row["figure"], value, _goal_text(row), command,
                                                            str(report["device"]), date)) + " |")
    problems = [(name, s) for name, s in report["stages"].items() if s["status"] != "ok"]
    if problems:
        lines.append("")
        for name, s in problems:
            lines.append(f"- stage {name}: {s['status']}" + (f" ({s['detail']})" if s["detail"] else "")
                         + (f", log {s['log']}" if s.get("log") else ""))
    return "\n".join(lines) + "\n"


def write_report(out: Path) -> dict[str, Any]:
    report = merge(out)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "benchmarks_rows.md").write_text(rows_markdown(report))
    return report


def print_summary(report: dict[str, Any]) -> None:
    print(f"GPU check on {report['device']}, {report['date']}" + (" (dry run)" if report["dry_run"] else ""))
    for name, s in report["stages"].items():
        took = f" in {s['seconds']:.0f} s" if s.get("seconds") is not None else ""
        print(f"  {name:15} {s['status']}{took}" + (f": {s['detail']}" if s["detail"] else ""))
    for row in report["figures"]:
        verdict = {True: "met", False: "NOT MET", None: "not measured"}[row["met"]] if row["goal_text"] else ""
        goal = f"   goal {row['goal_text']}: {verdict}" if row["goal_text"] else ""
        print(f"  {_value_text(row):>24}  {row['figure']}{goal}")
    g = report["goals"]
    print(f"goals: {g['met']} met, {g['not_met']} not met, {g['not_measured']} not measured; failed stages: "
          f"{', '.join(report['failed_stages']) or 'none'}")


# -------------------------------------------------------------------------------------------------- environment
def write_environment(out: Path, device: str, dry_run: bool) -> int:
    """OUT_DIR/environment.json: the device's name and the versions of everything the stages use; exit status 1
    when the device is not there (CUDA asked for and not available) or torch does not import."""
    here = str(Path(__file__).resolve().parent)  # common.py's folder (on sys.path already when run as a script)
    if here not in sys.path:
        sys.path.insert(0, here)
    env: dict[str, Any] = {"device": device, "dry_run": dry_run,
                           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "c_compiler": shutil.which("cc") or shutil.which("gcc"),
                           "nvidia_smi": shutil.which("nvidia-smi")}
    status = 0
    try:
        import torch
        from common import environment, package_version

        if device.startswith("cuda") and not torch.cuda.is_available():
            env.update(error="CUDA is not available to torch", torch=torch.__version__, cuda=torch.version.cuda)
            status = 1
        else:
            env.update(environment(device))
            if device.startswith("cuda"):
                props = torch.cuda.get_device_properties(torch.device(device))
                env.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                           capability=f"{props.major}.{props.minor}")
        for name in ("triton", "h5py", "numpy", "pytest", "fastapi", "uvicorn", "httpx", "onnxruntime"):
            env[name] = package_version(name)
    except Exception as e:  # any failure is what the report must say
        env["error"] = f"{type(e).__name__}: {e}"
        status = 1
    (out / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
    print(json.dumps(env, indent=2))
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="the GPU check's output folder")
    p.add_argument("--environment", metavar="DEVICE", default="",
                   help="write OUT_DIR/environment.json for DEVICE (cuda, cpu) instead of the report")
    p.add_argument("--dry_run", action="store_true", help="with --environment: mark the run a dry run")
    a = p.parse_args(argv)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if a.environment:
        return write_environment(out, a.environment, a.dry_run)
    report = write_report(out)
    print_summary(report)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'benchmarks_rows.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
