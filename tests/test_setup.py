"""The training setup policy (engine/setup.py) and the shared command-line vocabulary (utils/cli.py), directly."""

from __future__ import annotations

import pytest
from conftest import ROOT, tiny_config, tiny_vocab

import data_generator
import demo
import pipeline
import test
import train
from data.records import ImageRecord
from deploy.checkpoints import CheckpointError
from engine.setup import (
    TrainConfig,
    body_model_config,
    config_differences,
    eval_max_len,
    fresh_model_config,
    run_folder,
)
from models.config import MODEL_VARIANTS, ModelConfig, model_config
from utils.cli import ArgumentParser, LengthOptions, add_dataclass_flags, dataclass_values, resolve_max_len


def test_model_flags_are_generated_from_model_config_and_unset_ones_leave_the_variant_defaults():
    cfg = train.parse_config(["--features_path", str(ROOT), "--model", "expansionnet_v2", "--model_dim", "256",
                              "--memory_init", "m2", "--enc_drop", "0.3"])
    assert cfg.model_overrides == {"d_model": 256, "memory_init": "m2", "enc_drop": 0.3}
    built = model_config(cfg.model, **cfg.model_overrides)
    assert (built.d_model, built.N_enc, built.memory_slots, built.mult_residual) == (256, 3, 0, False)
    seed = model_config("optimizer_expansionnet")
    assert (seed.N_enc, seed.N_dec, seed.memory_slots, seed.mult_residual) == (2, 2, 40, True)
    assert set(MODEL_VARIANTS["expansionnet_v2"]) <= {f for f in ModelConfig.__dataclass_fields__}


def test_seed_spellings_are_aliases_and_booleans_read_true_false():
    cfg = train.parse_config(["--features_path", str(ROOT), "--warmup_iters", "7", "--backbone_save_path", str(ROOT),
                              "--amp", "none", "--compile", "True", "--grouped", "--vocab_path", str(ROOT)])
    assert (cfg.warmup, cfg.backbone_save_path, cfg.precision, cfg.compile, cfg.grouped) == (7, str(ROOT), "fp32",
                                                                                             True, True)
    assert cfg.vocab_path == str(ROOT)


def test_a_mistyped_flag_is_one_line_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exited:
        train.parse_config(["--features_path", str(ROOT), "--num_epoch", "3"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert "did you mean --num_epochs?" in err and len(err.splitlines()) <= 3


def test_body_checkpoint_keeps_its_architecture_takes_new_dropouts_and_refuses_conflicting_flags():
    body = tiny_config(end_to_end=False)
    cfg = body_model_config(body, {"enc_drop": 0.3, "d_model": body.d_model}, None, "b.pth")
    assert cfg.enc_drop == 0.3 and cfg.d_model == body.d_model and cfg.backbone is None
    with pytest.raises(CheckpointError, match=r"b\.pth holds another model.*--N_enc 3"):
        body_model_config(body, {"N_enc": 3}, None, "b.pth")


def test_fresh_model_takes_its_length_from_the_longest_training_caption_plus_twenty():
    vocab = tiny_vocab()
    records = [ImageRecord(1, ROOT / "a.png", ("a red circle and a blue square",), "train"),
               ImageRecord(2, ROOT / "b.png", ("a red circle and a blue square and a green triangle",) * 2, "val")]
    cfg = fresh_model_config("optimizer_expansionnet", {"d_model": 32, "num_heads": 4}, vocab, records, 24, None)
    assert cfg.max_seq_len == 9 + 20  # SOS + 7 words + EOS; the longer val caption does not count
    assert (cfg.vocab_size, cfg.img_feature_dim, cfg.d_model) == (len(vocab), 24, 32)


def test_validation_length_cap_follows_the_reference_unless_given():
    model = tiny_config()
    xe = TrainConfig(features_path="f")
    assert eval_max_len(xe, model) == model.max_seq_len - 1  # the reference decodes XE validation to capacity
    assert eval_max_len(TrainConfig(reinforce=True, scst_max_len=20), model) == 19  # its beam counts SOS
    assert eval_max_len(TrainConfig(eval_max_len=6), model) == 6


def test_resume_differences_ignore_runtime_settings_and_name_the_others():
    old = TrainConfig(features_path="f").as_dict()
    new = TrainConfig(features_path="f", num_workers=7, lr=1e-3, model_overrides={"d_model": 64}).as_dict()
    diffs = config_differences(old, new)
    assert any(d.startswith("--lr") for d in diffs) and any("model_overrides" in d for d in diffs)
    assert not any("num_workers" in d for d in diffs)
    assert run_folder(TrainConfig(reinforce=True, is_end_to_end=True)).name == "scst-e2e"


def test_length_cap_flags_mean_generated_tokens_and_the_reference_spelling_counts_sos():
    assert resolve_max_len(LengthOptions(), capacity=73) == 73
    assert resolve_max_len(LengthOptions(max_len=20), capacity=73) == 20
    assert resolve_max_len(LengthOptions(max_seq_len=20), capacity=73) == 19
    assert resolve_max_len(LengthOptions(max_len=500), capacity=73) == 73
    with pytest.raises(ValueError, match="not both"):
        resolve_max_len(LengthOptions(max_len=5, max_seq_len=5), capacity=73)
    with pytest.raises(ValueError, match="at least one"):
        resolve_max_len(LengthOptions(max_seq_len=1), capacity=73)


@pytest.mark.parametrize("script", [train, test, demo, data_generator, pipeline])
def test_help_groups_flags_by_concern_in_every_script(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_config(["--help"])
    out = capsys.readouterr().out
    assert "runtime:" in out and ("data:" in out or "model:" in out), script.__name__


def test_repeated_list_flags_extend_and_unset_ones_keep_their_default():
    from dataclasses import dataclass

    from utils.fields import option

    @dataclass(frozen=True)
    class Demo:
        sets: tuple[str, ...] = option((), "repeatable", nargs="+", group="data")
        sizes: tuple[int, ...] = option((3,), "a list", group="data")

    p = ArgumentParser()
    add_dataclass_flags(p, Demo)
    assert dataclass_values(p.parse_args(["--sets", "a=1", "--sets", "b=2"]), Demo) == {"sets": ("a=1", "b=2"),
                                                                                       "sizes": (3,)}
    assert dataclass_values(p.parse_args(["--sizes", "[2,4]"]), Demo) == {"sets": (), "sizes": (2, 4)}
