"""The seed's README commands and the reference's flags run as written: train.py's six phases, data_generator.py,
test.py and demo.py on tiny data; a flag of the reference that a script lacks gets one line naming its equivalent; the
did-you-mean suggests only a flag a typo away; test.py checks every input before it loads a model and records what
it measured."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_tiny_dataset, tiny_config
from processes import run_watched

import data_generator
import demo
import test
import train
from data.formats import load_records
from data.records import DatasetError
from data.vocab import build_vocabulary
from deploy.checkpoints import save_model_checkpoint
from models import build_model
from utils.checkpoint import load_checkpoint_file, state_dict_sha256
from utils.cli import ArgumentParser, closest, typing_edits

# The seed's README, word for word but for the paths ({...}), the model width (512 -> 32) and the epochs (-> 1): the
# flags each command gives are what is tested (train.py also gets --eval_max_len 8, see _argv).
SEED_COMMANDS = {
    "phase 1": """python data_generator.py
        --save_model_path {backbone} --output_path {features1} --images_path {data} --captions_path {data}""",
    "phase 2": """python train.py --N_enc 2 --N_dec 2
        --model_dim 32 --seed 775533 --optim_type radam --sched_type custom_warmup_anneal
        --warmup 10000 --lr 2e-4 --anneal_coeff 0.8 --anneal_every_epoch 2 --enc_drop 0.3
        --dec_drop 0.3 --enc_input_drop 0.3 --dec_input_drop 0.3 --drop_other 0.3
        --batch_size 48 --num_accum 1 --num_gpus 1 --ddp_sync_port 11317 --eval_beam_sizes [3]
        --save_path {saves} --save_every_minutes 60 --how_many_checkpoints 1
        --is_end_to_end False --features_path {features1} --partial_load False
        --print_every_iter 11807 --eval_every_iter 999999
        --reinforce False --num_epochs 1""",
    "phase 3": """python train.py --N_enc 2 --N_dec 2
        --model_dim 32 --optim_type radam --seed 775533   --sched_type custom_warmup_anneal
        --warmup 1 --lr 3e-5 --anneal_coeff 0.55 --anneal_every_epoch 1 --enc_drop 0.3
        --dec_drop 0.3 --enc_input_drop 0.3 --dec_input_drop 0.3 --drop_other 0.3
        --batch_size 8 --num_accum 3 --num_gpus 1 --ddp_sync_port 11317 --eval_beam_sizes [3]
        --save_path {saves} --save_every_minutes 60 --how_many_checkpoints 1
        --is_end_to_end True --images_path {data} --partial_load True
        --backbone_save_path {backbone}
        --body_save_path {saves}/xe-features/best.pth
        --print_every_iter 15000 --eval_every_iter 999999
        --reinforce False --num_epochs 1""",
    "phase 4": """python data_generator.py
        --save_model_path {saves}/xe-e2e/best.pth --output_path {features4}
        --images_path {data} --captions_path {data}""",
    "phase 5": """python train.py --N_enc 2 --N_dec 2
        --model_dim 32 --optim_type radam --seed 775533  --sched_type custom_warmup_anneal
        --warmup 1 --lr 1e-4 --anneal_coeff 0.8 --anneal_every_epoch 1 --enc_drop 0.1
        --dec_drop 0.1 --enc_input_drop 0.1 --dec_input_drop 0.1 --drop_other 0.1
        --batch_size 8 --num_accum 2 --num_gpus 1 --ddp_sync_port 11317 --eval_beam_sizes [5]
        --save_path {saves} --save_every_minutes 60 --how_many_checkpoints 1
        --is_end_to_end False --partial_load True
        --features_path {features4}
        --body_save_path {saves}/xe-e2e/best.pth
        --print_every_iter 4000 --eval_every_iter 99999
        --reinforce True --num_epochs 1""",
    "phase 6": """python train.py --N_enc 2 --N_dec 2
        --model_dim 32 --optim_type radam --seed 775533 --sched_type custom_warmup_anneal
        --warmup 1 --anneal_coeff 1.0 --lr 2e-6 --enc_drop 0.1
        --dec_drop 0.1 --enc_input_drop 0.1 --dec_input_drop 0.1 --drop_other 0.1
        --batch_size 4 --num_accum 2 --num_gpus 1 --ddp_sync_port 11317 --eval_beam_sizes [5]
        --save_path {saves} --save_every_minutes 60 --how_many_checkpoints 1
        --is_end_to_end True --images_path {data} --partial_load True
        --backbone_save_path {saves}/xe-e2e/best.pth
        --body_save_path {saves}/scst-features/best.pth
        --print_every_iter 15000 --eval_every_iter 999999
        --reinforce True --num_epochs 1""",
    "evaluation": """python test.py --N_enc 2 --N_dec 2 --model_dim 512
        --num_gpus 1 --eval_beam_sizes [5] --is_end_to_end True
        --save_model_path {saves}/scst-e2e/best.pth""",
    "demo": """python demo.py
        --load_path {saves}/scst-e2e/best.pth
        --image_paths {image} {image}""",
}

# The reference's README commands where they differ from the seed's (its test.py and demo.py), and its test.py flags
# the seed does not use: --eval_parallel_batch_size, --show_predictions, --is_ensemble.
REFERENCE_COMMANDS = {
    "reference evaluation": """python test.py --N_enc 2 --N_dec 2 --model_dim 512
        --num_gpus 1 --eval_beam_sizes [5] --is_end_to_end True
        --eval_parallel_batch_size 4 --images_path {data}
        --save_model_path {saves}/scst-e2e/best.pth --output_dir {out}/reference""",
    "reference ensemble": """python test.py --N_enc 2 --N_dec 2 --model_dim 512 --num_gpus 1 --eval_beam_sizes [5]
        --is_end_to_end True --is_ensemble True --show_predictions True --eval_parallel_batch_size 4
        --images_path {data} --save_model_path {saves}/scst-e2e/ --output_dir {out}/ensemble""",
    "reference demo": """python demo.py --load_path {saves}/scst-e2e/best.pth --image_paths {image}
        --beam_size 5 --max_seq_len 74 --device cpu --model_dim 512 --N_enc 2 --N_dec 2""",
}


def _argv(command: str, paths: dict[str, Path]) -> tuple[str, list[str]]:
    """(script, its arguments) of a command with its paths filled in; train.py validates captions of at most 8
    tokens (an untrained tiny model's run to the model's length is most of a phase's time on the CPU)."""
    words = shlex.split(command.format(**{k: str(v) for k, v in paths.items()}))
    assert words[0] == "python"
    return words[1], words[2:] + (["--eval_max_len", "8"] if words[1] == "train.py" else [])


@pytest.fixture
def seed_paths(tmp_path: Path) -> dict[str, Path]:
    """The folders and files the seed's commands name, on a tiny synthetic dataset laid out as the seed's: images
    and the Karpathy file (dataset_coco.json) in one folder."""
    captions, backbone = make_tiny_dataset(tmp_path, num_train=16)
    shutil.copy(captions, captions.parent / "dataset_coco.json")
    return {"data": captions.parent, "backbone": backbone, "features1": tmp_path / "features1.hdf5",
            "features4": tmp_path / "features4.hdf5", "saves": tmp_path / "saves", "out": tmp_path / "out",
            "image": next((captions.parent / "images").glob("*.png"))}


def test_every_seed_and_reference_command_form_parses(seed_paths: dict[str, Path]) -> None:
    for name in ("saves/xe-features", "saves/xe-e2e", "saves/scst-features", "saves/scst-e2e"):
        (seed_paths["backbone"].parent / name).mkdir(parents=True)
        (seed_paths["backbone"].parent / name / "best.pth").write_bytes(b"not read by parse_config")
    seed_paths["features1"].write_bytes(b"")
    seed_paths["features4"].write_bytes(b"")
    scripts = {"train.py": train, "test.py": test, "demo.py": demo, "data_generator.py": data_generator}
    for name, command in {**SEED_COMMANDS, **REFERENCE_COMMANDS}.items():
        script, argv = _argv(command, seed_paths)
        assert scripts[script].parse_config(argv), name
    cfg = test.parse_config(_argv(REFERENCE_COMMANDS["reference ensemble"], seed_paths)[1])
    assert (cfg.batch_size, cfg.is_ensemble, cfg.show_predictions, cfg.is_end_to_end) == (4, True, True, True)


GENERATOR_ARGV = ["--save_model_path", str(ROOT), "--output_path", "f.hdf5", "--images_path", str(ROOT),
                  "--captions_path", str(ROOT)]


@pytest.mark.parametrize(("script", "argv", "answer"), [
    (test, ["--checkpoint", str(ROOT), "--preproc_images_hdf5_filepath", "x.hdf5"], "--preproc_images_hdf5_filepath "
     "(the reference's HDF5 file of pre-resized images) has no equivalent here: images are decoded from --images_path"),
    (train, ["--features_path", str(ROOT), "--preproc_images_hdf5_filepath", "x.hdf5"], "cache their features with "
     "data_generator.py and pass --features_path"),
    (data_generator, [*GENERATOR_ARGV, "--preproc_images_hdf5_filepath", "x.hdf5"], "has no equivalent here"),
    (train, ["--features_path", str(ROOT), "--max_seq_len", "74"], "--max_seq_len (the reference's longest caption a "
     "model holds) has no equivalent here: the model's length comes from the training captions"),
])
def test_a_reference_flag_a_script_lacks_gets_one_line_naming_what_to_use(script, argv, answer, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        script.parse_config(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and answer in err and "did you mean" not in err
    assert len(err.strip().splitlines()) == 2  # the error, then where --help is


def test_train_reads_the_reference_eval_parallel_batch_size_or_names_its_flag(capsys) -> None:
    """Either train.py takes the reference's spelling (an alias of --eval_batch_size) or says what it is called."""
    try:
        cfg = train.parse_config(["--features_path", str(ROOT), "--eval_parallel_batch_size", "4"])
    except SystemExit:
        assert "--eval_parallel_batch_size (the reference's number of images decoded together) is --eval_batch_size " \
               "here" in capsys.readouterr().err
    else:
        assert cfg.eval_batch_size == 4


def _parser(*flags: str) -> ArgumentParser:
    parser = ArgumentParser(prog="script.py")
    for flag in flags:
        parser.add_argument(flag)
    return parser


def _error(parser: ArgumentParser, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    return capsys.readouterr().err


def test_did_you_mean_suggests_only_a_flag_a_typo_away_never_one_sharing_a_word(capsys) -> None:
    parser = _parser("--predictions_only", "--eval_beam_sizes", "--num_epochs", "--images_path", "--batch_size")
    assert "did you mean" not in _error(parser, ["--show_predictions", "True"], capsys)
    assert "did you mean" not in _error(parser, ["--beam_search", "3"], capsys)
    err = _error(parser, ["--eval_parallel_batch_size", "4"], capsys)
    assert "is --batch_size here" in err and "--eval_beam_sizes" not in err
    assert "--num_epoch: did you mean --num_epochs?" in _error(parser, ["--num_epoch", "3"], capsys)
    assert "--imgaes-path: did you mean --images_path?" in _error(parser, ["--imgaes-path", "x"], capsys)
    assert "--batchsize: did you mean --batch_size?" in _error(parser, ["--batchsize=4"], capsys)


def test_typing_edits_count_added_dropped_changed_and_swapped_letters() -> None:
    assert typing_edits("num_epoch", "num_epochs") == 1
    assert typing_edits("imgaes_path", "images_path") == 1  # two neighbours swapped
    assert typing_edits("save-path", "save_path") == 0 and typing_edits("LR", "lr") == 0
    assert typing_edits("show_predictions", "predictions_only") > 8
    assert typing_edits("", "abc") == 3 and typing_edits("abc", "") == 3
    assert closest("show_predictions", ["predictions_only"]) == "predictions_only"  # similar by difflib alone
    assert closest("show_predictions", ["predictions_only"], max_edits=3) is None
    assert closest("opst", ["opset", "output"], max_edits=1) == "opset"


@pytest.fixture
def recorded(tmp_path: Path) -> dict[str, Path]:
    """A tiny end-to-end checkpoint whose training run recorded its images and captions, and one that recorded none."""
    captions, _ = make_tiny_dataset(tmp_path, num_train=16)
    records = load_records(captions, captions.parent)
    vocab = build_vocabulary([c for r in records for c in r.captions], min_count=1)
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=len(vocab))
    model = build_model(cfg)
    run = {"captions_path": str(captions), "images_path": str(captions.parent), "is_end_to_end": True}
    return {"captions": captions, "images": captions.parent,
            "recorded": save_model_checkpoint(tmp_path / "run" / "best.pth", model, cfg, vocab, train_config=run),
            "bare": save_model_checkpoint(tmp_path / "bare" / "best.pth", model, cfg, vocab)}


def _no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(test, "load_model", refuse)


def test_a_missing_captions_file_is_refused_before_any_model_is_loaded(recorded, monkeypatch, capsys) -> None:
    _no_model_load(monkeypatch)
    cfg = test.parse_config(["--checkpoint", str(recorded["bare"]), "--images_path", str(recorded["images"])])
    with pytest.raises(DatasetError, match="no captions file: pass --captions_path"):
        test.main(cfg)


@pytest.mark.parametrize(("argv", "message"), [
    ([], r"give --images_path \(end-to-end checkpoint\) or --features_path \(cached features\): .*best.pth records "
         "no training run"),
    (["--split", "val", "--captions_path", "{captions}", "--images_path", "{captions}"],
     "none of the 8 val images exists"),
    (["--captions_path", "{captions}", "--images_path", "{images}", "--max_len", "3", "--max_seq_len", "4"],
     "not both"),
    (["--captions_path", "{captions}", "--is_ensemble", "True"], "is a file; give its folder"),
])
def test_test_py_refuses_each_bad_input_before_loading_a_model(recorded, monkeypatch, argv, message) -> None:
    _no_model_load(monkeypatch)
    argv = [a.format(captions=recorded["captions"], images=recorded["images"]) for a in argv]
    cfg = test.parse_config(["--checkpoint", str(recorded["bare"]), *argv])
    with pytest.raises((DatasetError, ValueError), match=message):
        test.main(cfg)


def test_an_earlier_evaluation_is_refused_before_loading_a_model(recorded, monkeypatch) -> None:
    _no_model_load(monkeypatch)
    (recorded["recorded"].parent / "metrics_test_beam5.json").write_text("{}")
    with pytest.raises(FileExistsError, match="metrics_test_beam5.json holds an earlier evaluation"):
        test.main(test.parse_config(["--checkpoint", str(recorded["recorded"])]))


def test_the_seed_test_command_uses_the_recorded_data_and_records_what_it_measured(recorded, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    argv = ["--N_enc", "2", "--N_dec", "2", "--model_dim", "512", "--num_gpus", "1", "--eval_beam_sizes", "[2]",
            "--is_end_to_end", "True", "--save_model_path", str(recorded["recorded"]), "--output_dir", str(out),
            "--metrics", "BLEU", "CIDEr", "--max_len", "5", "--num_workers", "0", "--backend", "torch"]
    (row,) = test.main(test.parse_config(argv))
    said = capsys.readouterr().out
    assert f"image folder: {recorded['images']} (recorded by" in said
    assert f"captions: {recorded['captions']} (recorded by" in said
    weights = state_dict_sha256(load_checkpoint_file(recorded["recorded"])["model_state_dict"])
    measured = {"weights_sha256": weights, "backend": "torch", "precision": "fp32", "beam_size": 2, "max_len": 5,
                "split": "test", "split_size": 8}
    assert {k: row[k] for k in measured} == measured and row["num_images"] == 8
    assert json.loads((out / "metrics_test_beam2.json").read_text()) == row
    predictions = json.loads((out / "predictions_test_beam2.json").read_text())
    assert len(predictions) == 8 and all({k: p[k] for k in measured} == measured for p in predictions)


def test_evaluation_precision_defaults_to_fp32_whatever_the_device() -> None:
    cfg = test.parse_config(["--checkpoint", str(ROOT)])
    assert cfg.precision == "fp32"
    assert test.parse_config(["--checkpoint", str(ROOT), "--amp", "bf16"]).precision == "bf16"


@pytest.mark.slow
def test_the_seed_readme_and_reference_commands_run_on_tiny_data(seed_paths: dict[str, Path]) -> None:
    """Each command in its order, as a user runs it: the phases read what the earlier ones wrote."""
    for name, command in {**SEED_COMMANDS, **REFERENCE_COMMANDS}.items():
        script, argv = _argv(command, seed_paths)
        proc = run_watched([sys.executable, script, *argv], cwd=ROOT)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    saves, out = seed_paths["saves"], seed_paths["out"]
    for phase in ("xe-features", "xe-e2e", "scst-features", "scst-e2e"):
        assert (saves / phase / "best.pth").is_file(), phase
    assert json.loads((saves / "scst-e2e" / "metrics_test_beam5.json").read_text())["split_size"] == 8
    assert json.loads((out / "reference" / "metrics_test_beam5.json").read_text())["precision"] == "fp32"
    ensemble = json.loads((out / "ensemble" / "metrics_test_beam5.json").read_text())
    assert ensemble["backend"] == "ensemble" and len(ensemble["checkpoint"]) == 2  # best.pth and the rolling one
    assert "    ref: " in (out / "ensemble" / "predictions_test_beam5.txt").read_text()
