"""The GPU check (benchmarks/gpu_check.sh): its report's merging on hand-written stage results (goals met and not met,
failed, skipped and missing stages), the benchmarks' JSON record, and the whole script in its CPU dry run."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from processes import run_watched

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def load(name: str):
    """A module of benchmarks/ (they import each other as top-level modules, as when run as scripts)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


report = load("gpu_report")

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="{failures}"
skipped="0" tests="3"><testcase classname="tests.test_gpu_paths" name="test_a"/><testcase
classname="tests.test_gpu_paths" name="test_b"/><testcase classname="tests.test_gpu_paths" name="test_c">{failure}
</testcase></testsuite></testsuites>"""


def write_stages(out: Path, rows: dict[str, tuple[str, str]]) -> None:
    """stages.tsv as gpu_check.sh writes it: name, status, exit code, seconds, detail, command."""
    lines = [f"{name}\t{status}\t{0 if status == 'ok' else 1}\t12\t{detail}\tpython benchmarks/x.py --device cuda "
             f"--json $OUT/{name}.json" for name, (status, detail) in rows.items()]
    (out / "stages.tsv").write_text("\n".join(lines) + "\n")


def write_gpu_run(out: Path, caption_img_s: float = 450.0, xe_img_s: float = 2000.0, scst_img_s: float = 600.0,
                  test_failure: bool = False) -> None:
    """Every stage's output of a GPU run, with the given figures."""
    env = {"device": "cuda", "device_name": "NVIDIA H200", "date": "2026-12-01T10:00:00+00:00", "torch": "2.11.0",
           "timm": "1.0.29", "python": "3.11.9", "cuda": "12.8"}
    (out / "environment.json").write_text(json.dumps(env))
    (out / "gpu_tests.xml").write_text(JUNIT.format(
        failures=int(test_failure), failure='<failure message="boom">boom</failure>' if test_failure else ""))

    def bench(name: str, settings: dict, figures: dict) -> None:
        (out / f"{name}.json").write_text(json.dumps({"environment": env, "settings": settings, "figures": figures,
                                                      "complete": True}))

    e2e = {"caption_img_s": caption_img_s, "backbone_img_s": 520.0, "share_of_ceiling": caption_img_s / 520.0,
           "batch": 64, "beam": 5, "max_len": 20, "img_size": 384, "precision": "bf16", "compile": True,
           "backbone": "swinv2_b"}
    bench("decoding", {"batch": 0, "e2e_batch": 64}, {"end_to_end": {"optimizer_expansionnet": e2e}})
    bench("train_features", {"amp": "bf16"}, {
        "xe": {"ours_img_s": xe_img_s, "reference_style_img_s": 900.0, "batch": 48, "precision": "bf16",
               "compile": True},
        "scst": {"ours_img_s": scst_img_s, "reference_formulation_img_s": 45.0, "batch": 24, "samples": 5,
                 "precision": "bf16", "compile": True}})
    bench("train_e2e", {}, {"e2e_xe": {"grouped_img_s": 80.0, "caption_wise_pairs_s": 50.0, "peak_gib": 18.5,
                                       "batch": 16, "captions_per_image": 5, "img_size": 384, "backbone": "swinv2_b",
                                       "precision": "bf16"}})
    bench("data", {}, {"generation": {"img_s": 300.0, "batch": 64, "img_size": 384, "backbone": "swinv2_b",
                                      "precision": "bf16"}})
    phase = {"requests_per_s": 40.0, "p50_ms": 20.0, "p95_ms": 30.0}
    (out / "serving.json").write_text(json.dumps({
        "config": {"concurrency": 16, "img_size": 64, "beam_size": 3, "device": "cuda", "precision": "bf16"},
        "this checkout": {"sequential": phase, "concurrent": {**phase, "requests_per_s": 120.0},
                          "throughput_ratio": 3.0}}))


def figure(merged: dict, start: str) -> dict:
    return next(f for f in merged["figures"] if f["figure"].startswith(start))


def test_merge_puts_every_stage_and_figure_beside_its_goal(tmp_path):
    write_stages(tmp_path, {name: ("ok", "") for name in report.STAGES})
    write_gpu_run(tmp_path, caption_img_s=450.0, xe_img_s=2000.0, scst_img_s=600.0)
    assert report.main([str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "gpu_check.json").read_text())
    assert merged["device"] == "NVIDIA H200" and merged["date"].startswith("2026-12-01")
    assert merged["versions"]["torch"] == "2.11.0" and merged["versions"]["timm"] == "1.0.29"
    assert merged["ok"] and not merged["failed_stages"] and not merged["dry_run"]
    assert list(merged["stages"]) == list(report.STAGES)
    assert all(s["status"] == "ok" for s in merged["stages"].values())

    captioning = figure(merged, "end-to-end captioning")
    assert captioning["value"] == 450.0 and captioning["goal"] == 400.0 and captioning["met"] is True
    assert "batch 64" in captioning["figure"] and "bf16" in captioning["figure"] and "compiled" in captioning["figure"]
    xe = figure(merged, "XE step on cached features")
    assert xe["goal"] == pytest.approx(3 * 914) and xe["met"] is False
    scst = figure(merged, "SCST step on cached features")
    assert scst["goal"] == pytest.approx(494) and scst["met"] is True
    assert figure(merged, "captioning's share")["value"] == pytest.approx(100 * 450 / 520, abs=1e-3)
    assert figure(merged, "end-to-end XE step, peak GPU memory")["value"] == 18.5
    assert figure(merged, "HTTP API, concurrent clients against")["met"] is True
    tests = figure(merged, "CUDA-marked tests")
    assert tests["value"] == 3 and tests["met"] is True
    assert merged["goals"] == {"met": 4, "not_met": 1, "not_measured": 0}

    rows = (tmp_path / "benchmarks_rows.md").read_text()
    assert rows.startswith("| figure | value | goal | command | device | date |")
    assert "| 450.0 img/s | >= 400 img/s: **met** |" in rows
    assert "2742 img/s: **not met**" in rows
    assert "NVIDIA H200 | 2026-12-01 |" in rows
    assert "--json" not in rows and "$OUT" not in rows  # the check's own output options are not part of a command
    assert len([line for line in rows.splitlines() if line.startswith("| ")]) == 1 + len(merged["figures"])


def test_a_failed_stage_fails_the_check_and_keeps_what_it_measured(tmp_path):
    stages = {name: ("ok", "") for name in report.STAGES}
    stages["train_features"] = ("failed", "timed out after 150 s")
    stages["gpu_tests"] = ("failed", "exit status 1")
    write_stages(tmp_path, stages)
    write_gpu_run(tmp_path, test_failure=True)
    record = json.loads((tmp_path / "train_features.json").read_text())
    del record["figures"]["scst"]  # cut short after the XE figure
    record["complete"] = False
    (tmp_path / "train_features.json").write_text(json.dumps(record))

    merged = report.write_report(tmp_path)
    assert not merged["ok"] and merged["failed_stages"] == ["gpu_tests", "train_features"]
    stage = merged["stages"]["train_features"]
    assert (stage["status"], stage["detail"], stage["exit_code"]) == ("failed", "timed out after 150 s", 1)
    xe = figure(merged, "XE step on cached features")
    assert xe["value"] == 2000.0 and "measured before the stage failed" in xe["note"]
    scst = figure(merged, "SCST step on cached features")
    assert scst["value"] is None and scst["met"] is None and "timed out after 150 s" in scst["note"]
    tests = figure(merged, "CUDA-marked tests")
    assert tests["value"] == 2 and tests["met"] is False and "tests.test_gpu_paths::test_c" in tests["note"]
    assert merged["goals"]["not_measured"] == 1

    rows = (tmp_path / "benchmarks_rows.md").read_text()
    assert "| not measured (stage failed: timed out after 150 s) |" in rows
    assert "- stage train_features: failed (timed out after 150 s)" in rows


def test_skipped_and_missing_stages(tmp_path):
    """A stage skipped for a missing module is not a failure; a stage with no line in stages.tsv (the script was
    stopped before it) is; a stage with no JSON has no figures."""
    stages = {name: ("ok", "") for name in report.STAGES}
    stages["serving"] = ("skipped", "missing Python module(s): fastapi uvicorn")
    del stages["data"]
    write_stages(tmp_path, stages)
    write_gpu_run(tmp_path)
    for name in ("serving.json", "data.json"):
        (tmp_path / name).unlink()

    merged = report.write_report(tmp_path)
    assert merged["stages"]["serving"]["status"] == "skipped"
    assert merged["stages"]["data"]["status"] == "failed" and "not run" in merged["stages"]["data"]["detail"]
    assert merged["failed_stages"] == ["data"] and not merged["ok"]
    api = figure(merged, "HTTP API, concurrent clients against")
    assert api["value"] is None and api["met"] is None and "missing Python module(s): fastapi" in api["note"]
    assert api["figure"] == "HTTP API, concurrent clients against one at a time"  # settings unknown: left out
    assert figure(merged, "feature generation")["value"] is None


def test_nothing_recorded_still_gives_a_report(tmp_path):
    merged = report.write_report(tmp_path)
    assert set(merged["stages"]) == set(report.STAGES) and not merged["ok"]
    assert all(f["value"] is None for f in merged["figures"])
    assert (tmp_path / "benchmarks_rows.md").exists()


def test_json_figures_are_written_after_each_figure(tmp_path):
    common = load("common")
    path = tmp_path / "sub" / "figures.json"
    figures = common.JsonFigures(str(path), "bench_x", "cpu", {"batch": 4, "precision": "bf16"})
    figures.add("end_to_end", "seed", values={"img_s": 12.5, "peak_gib": float("nan")})
    record = json.loads(path.read_text())
    assert record["figures"] == {"end_to_end": {"seed": {"img_s": 12.5, "peak_gib": None}}}
    assert record["settings"]["batch"] == 4 and not record["complete"]
    assert record["environment"]["torch"] and record["environment"]["device_name"].startswith("CPU")
    figures.finish()
    assert json.loads(path.read_text())["complete"] is True
    common.JsonFigures("", "bench_x", "cpu", {}).add("x", values={"a": 1})  # no path: nothing written, no error


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_stage_on_the_cpu(tmp_path):
    """The whole script on the CPU at tiny sizes: every stage recorded with a status, the figures of the stages that
    ran, the rows for docs/benchmarks.md."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DRY_RUN": "1"}
    proc = run_watched(["bash", str(BENCH / "gpu_check.sh"), str(out)], cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    merged = json.loads((out / "gpu_check.json").read_text())
    assert merged["dry_run"] is True and merged["ok"]
    assert list(merged["stages"]) == list(report.STAGES)
    assert all(s["status"] in ("ok", "skipped") for s in merged["stages"].values()), merged["stages"]
    for fig in merged["figures"]:
        stage = merged["stages"][fig["stage"]]
        if stage["status"] == "ok" and fig["unit"] != "GiB":  # peak memory is measured on a GPU only
            assert fig["value"] is not None, fig
        assert fig["met"] in (True, False, None)
    tests = figure(merged, "CUDA-marked tests")
    assert tests["tests"]["skipped"] == tests["tests"]["tests"] > 0  # no CUDA here: collected and skipped
    for name in ("decoding", "train_features", "train_e2e", "data"):
        assert merged["stages"][name]["status"] == "ok", merged["stages"][name]
        assert (out / f"{name}.log").exists()
    rows = (out / "benchmarks_rows.md").read_text()
    assert "Dry run" in rows and "| figure | value | goal | command | device | date |" in rows
