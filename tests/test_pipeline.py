"""pipeline.py: phase selection, skipping finished phases, resuming an interrupted one, and the quickstart learns."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest
from conftest import ROOT
from processes import run_watched, wait_while_progressing

import pipeline
import train
from engine.overrides import OverrideError, apply_overrides
from engine.pipeline import ChangedPhasesError, as_argv, command_differences, parse_phases
from engine.presets import coco_recipe

TINY = ["--preset", "quickstart", "--num_train", "40", "--num_val", "8", "--num_test", "8"]


def test_phase_ranges_parse_and_bad_ranges_are_refused():
    assert parse_phases("0-6") == [0, 1, 2, 3, 4, 5, 6]
    assert parse_phases("2-5") == [2, 3, 4, 5]
    assert parse_phases("3") == [3]
    assert parse_phases("2,4,5") == [2, 4, 5]
    for bad in ("-1-3", "5-7", "", "x", "1-x"):
        with pytest.raises(ValueError):
            parse_phases(bad)


def _readme_train_commands() -> dict[int, list[str]]:
    """The README's train.py commands of phases 2, 3, 5 and 6, as argument lists."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"#### (\d)\. [^\n]*\n+```\n(python train.py.*?)```", text, flags=re.S)
    return {int(n): shlex.split(cmd.replace("\\\n", " "))[2:] for n, cmd in blocks}


def test_readme_six_commands_match_the_preset_table():
    """The seed's commands in the README and engine/presets.py's SEED_RECIPE describe the same runs."""
    commands = _readme_train_commands()
    assert sorted(commands) == [2, 3, 5, 6]
    recipe = coco_recipe(ROOT, ROOT, ROOT, expansionnet_v2=False)
    neutral = {"features_path", "images_path", "captions_path", "backbone_save_path", "body_save_path", "save_path",
               "run_name", "num_gpus", "ddp_sync_port", "partial_load"}
    for number, argv in commands.items():
        readme = train.parse_config([a if not a.startswith("./") else str(ROOT) for a in argv])
        ours = train.parse_config(as_argv(recipe.settings[number]) + as_argv(
            {"is_end_to_end": number in (3, 6), "reinforce": number in (5, 6), "features_path": str(ROOT),
             "images_path": str(ROOT)}))
        differ = {k for k, v in readme.as_dict().items() if v != ours.as_dict()[k]} - neutral
        assert not differ, (number, {k: (readme.as_dict()[k], ours.as_dict()[k]) for k in differ})


def test_overrides_reach_the_phases_that_take_them_and_bad_ones_are_refused_with_a_hint():
    recipe = coco_recipe(ROOT, ROOT, ROOT, expansionnet_v2=False)
    changed = apply_overrides(recipe, ["lr=1e-4", "phase2.num_epochs=1", "batch_size=2", "phase3.eval_beam_sizes=[2]"])
    assert all(changed.settings[n]["lr"] == 1e-4 for n in (2, 3, 5, 6))
    assert changed.settings[2]["num_epochs"] == 1 and changed.settings[3]["num_epochs"] == 2
    assert changed.settings[1]["batch_size"] == 2 and changed.settings[6]["batch_size"] == 2  # features phases too
    assert changed.settings[3]["eval_beam_sizes"] == (2,)
    assert recipe.settings[2]["lr"] == 2e-4  # the preset itself is untouched
    for bad, message in (("lr", "key=value"), ("num_epoch=3", "did you mean num_epochs"),
                         ("phase9.lr=1", "no phase 9"), ("lr=fast", "could not convert"),
                         ("features_path=x", "set by the pipeline"), ("optim_type=sgd", "choose one of")):
        with pytest.raises(OverrideError, match=message):
            apply_overrides(recipe, [bad])


def test_the_quickstart_refuses_paths_it_would_ignore(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        pipeline.parse_config(["--preset", "quickstart", "--captions_path", str(tmp_path)])
    assert exited.value.code == 2 and "would ignore --captions_path" in capsys.readouterr().err


@pytest.mark.slow
def test_a_phase_whose_inputs_are_missing_is_refused_clearly(tmp_path):
    proc = run_watched([sys.executable, "pipeline.py", *TINY, "--run_dir", str(tmp_path), "--phases", "3"], cwd=ROOT)
    assert proc.returncode != 0
    assert "phase 3 needs the output of phase(s) [0, 2]" in proc.stderr


@pytest.mark.slow
def test_rerun_skips_finished_phases_and_redoes_the_interrupted_one(tmp_path):
    cmd = [sys.executable, "pipeline.py", *TINY, "--run_dir", str(tmp_path), "--phases", "0-3", "--no_report"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = tmp_path / "phase3-xe-e2e" / "metrics.jsonl"  # phase 3 has started training
    try:
        started = wait_while_progressing(marker.exists, proc, watch=[tmp_path])
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    assert started, "the pipeline ended before phase 3 started training"
    proc.wait()
    manifest = json.loads((tmp_path / "pipeline.json").read_text())
    assert all(manifest["phases"][n]["status"] == "done" for n in ("0", "1", "2"))
    assert manifest["phases"]["3"]["status"] == "running"
    features = tmp_path / "phase1-features" / "features.hdf5"
    stamp = features.stat().st_mtime_ns
    again = run_watched(cmd, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "phase 1 (features from the initial backbone): already done, skipping" in again.stdout
    assert "phase 2 (cross-entropy on cached features): already done, skipping" in again.stdout
    manifest = json.loads((tmp_path / "pipeline.json").read_text())
    assert manifest["phases"]["3"]["status"] == "done" and (tmp_path / "phase3-xe-e2e" / "best.pth").exists()
    assert features.stat().st_mtime_ns == stamp  # nothing finished was redone
    assert "--body_save_path" in manifest["phases"]["3"]["command"]


# The quickstart recipe on a quarter of its data, SCST shortened (every phase and the report still run): about 160 s
# with 2 threads, 190-250 s on one of make test's single-thread workers, instead of 340-490 for the full run. Measured
# (2026-12-07, Intel Xeon; the best constant caption 50.2): CIDEr-D 106.8 and colours named 75% with 2 threads, 104.0
# and 70% with one, 109.8 and 74% under MKL's and ATen's AVX2 kernels with one, 120.1 and 77% under ATen's portable
# kernels with MKL_CBWR=COMPATIBLE and one thread; shapes are not learned from 1,000 images (colour + shape 17-22%).
SHORT_QUICKSTART = ["--num_train", "1000", "--num_val", "100", "--num_test", "200",
                    "--set", "phase5.max_steps=40", "phase6.max_steps=10"]


@pytest.mark.slow
def test_the_quickstart_recipe_on_a_quarter_of_its_data_learns_colours_beyond_the_language_prior(tmp_path):
    """The quickstart's phases and report on 1,000 training images (make test's share of the full run, which
    `make test-quickstart` checks against the README's floors): CIDEr-D at least 1.5x the best constant caption
    (2.1x measured), colours named for >= 60% of the shape groups (75%), SCST not below XE."""
    proc = run_watched([sys.executable, "pipeline.py", "--preset", "quickstart", "--run_dir", str(tmp_path),
                        *SHORT_QUICKSTART], cwd=ROOT, watch=[tmp_path])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "pipeline.json").read_text())["results"]
    assert r["test_cider_final"] >= 1.5 * r["best_constant_cider"], r
    assert r["test_cider_final"] >= r["test_cider_xe"], r
    assert r["colour_named"] >= 0.60, r
    assert (tmp_path / "test_captions.png").exists() and (tmp_path / "report.md").exists()


@pytest.mark.slow
@pytest.mark.quickstart
def test_quickstart_learns_beyond_the_language_prior(tmp_path):
    """`make quickstart` as it ships reaches the issue's floors, with a margin for run-to-run noise (another CPU sums in
    another order): CIDEr-D at least 3x the best constant caption, colours named for >= 93% of the shape groups (goal
    95%; 96.3% measured), colour + shape word right >= 86% (goal 80%; 91.5%), the right number for >= 88% of the
    named shapes (goal 90%; 93.3%), and SCST not below XE. Run by `make test-quickstart` (6-9 minutes)."""
    # no wall-clock limit: 466 s on 2 quiet cores, 918 s under a load of 3.5; only a run that stops progressing fails
    proc = run_watched([sys.executable, "pipeline.py", "--preset", "quickstart", "--run_dir", str(tmp_path)], cwd=ROOT,
                       watch=[tmp_path])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "pipeline.json").read_text())["results"]
    assert r["test_cider_final"] >= 3 * r["best_constant_cider"], r
    assert r["test_cider_final"] >= r["test_cider_xe"], r
    grounded = json.loads((tmp_path / "results.json").read_text())["grounded_final"]
    assert grounded["colour_named"] >= 0.93, grounded
    assert grounded["colour_accuracy"] >= 0.86, grounded
    assert grounded["count_when_named"] >= 0.88, grounded
    for picture in ("test_captions.png", "report.md", "curves-phase2-xe-features.png"):
        assert (tmp_path / picture).exists(), picture
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["test_final"]["official"] in (True, False)
    assert set(results["test_final"]["metrics"]) >= {"BLEU-4", "ROUGE-L", "CIDEr-D"}


def _fake_phase(phase, command, run_dir, record, manifest, env):
    """Stands in for a phase's subprocess: writes the phase's output file and records it as the real one does."""
    folder = run_dir / phase.folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / (phase.writes or "best.pth")).write_text(" ".join(command))
    record.update({"title": phase.title, "command": " ".join(["python", *command]), "argv": list(command),
                   "status": "done"})


def test_command_differences_name_changed_added_and_dropped_flags():
    old = ["train.py", "--lr", "0.001", "--num_epochs", "6", "--grouped", "True"]
    new = ["train.py", "--lr", "0.0001", "--num_epochs", "6", "--seed", "1"]
    assert command_differences(old, new) == ["--lr: 0.001 -> 0.0001", "--grouped True dropped", "--seed 1 added"]
    assert command_differences(["backbone.py", "pretrain", "--epochs", "4"], ["backbone.py", "pretrain", "--epochs",
                                                                              "4"]) == []


def test_a_finished_phase_asked_to_run_with_other_settings_is_refused_before_anything_is_written(tmp_path, capsys,
                                                                                                 monkeypatch):
    monkeypatch.setattr("engine.pipeline.run_phase", _fake_phase)
    first = [*TINY, "--run_dir", str(tmp_path), "--no_report", "--set", "phase2.num_epochs=2"]
    assert pipeline.main(pipeline.parse_config(first)) == 0
    manifest = json.loads((tmp_path / "pipeline.json").read_text())
    assert all(manifest["phases"][str(n)]["status"] == "done" for n in range(7))
    assert manifest["phases"]["2"]["overrides"] == ["phase2.num_epochs=2"] and "overrides" not in manifest
    before = (tmp_path / "pipeline.json").read_bytes()

    changed = [*TINY, "--run_dir", str(tmp_path), "--no_report", "--set", "phase2.num_epochs=3", "phase5.lr=1e-5"]
    with pytest.raises(ChangedPhasesError) as refused:
        pipeline.main(pipeline.parse_config(changed))
    message = str(refused.value)
    assert "phase 2 (done): --num_epochs: 2 -> 3" in message and "phase 5 (done): --lr: 3e-05 -> 1e-05" in message
    assert "phase 3 (done): reads phase 2, which runs again" in message and "phase 1" not in message
    assert "--rerun_changed True" in message
    assert (tmp_path / "pipeline.json").read_bytes() == before  # nothing ran, nothing recorded
    assert "already done, skipping" not in capsys.readouterr().out

    assert pipeline.main(pipeline.parse_config([*changed, "--rerun_changed", "True"])) == 0
    out = capsys.readouterr().out
    assert "phase 1 (features from the initial backbone): already done, skipping" in out
    assert "phase 2: its earlier run (other settings) moved to" in out
    manifest = json.loads((tmp_path / "pipeline.json").read_text())
    assert "--num_epochs 3" in manifest["phases"]["2"]["command"] and "--lr 1e-05" in manifest["phases"]["5"]["command"]
    assert manifest["phases"]["6"]["overrides"] == ["phase2.num_epochs=3", "phase5.lr=1e-5"]
    assert manifest["phases"]["1"].get("overrides") == ["phase2.num_epochs=2"]  # it did not run again
    replaced = sorted(p.name.rsplit("-", 2)[0] for p in (tmp_path / "replaced").iterdir())
    assert replaced == ["phase2-xe-features", "phase3-xe-e2e", "phase4-features", "phase5-scst-features",
                        "phase6-scst-e2e"]
    assert pipeline.main(pipeline.parse_config(changed)) == 0  # the same command again: all skipped
    assert capsys.readouterr().out.count("already done, skipping") == 7
