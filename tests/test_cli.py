"""utils.cli: settings read the same from a flag and from text (pipeline.py --set), one did-you-mean that knows a
sub-command's flags, flags of which one at most may be given, and export.py on the common checkpoint flags."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import pytest

import backbone
import demo
import export
import test as test_script
from data import captions, synthetic
from engine.features import GeneratorConfig
from engine.pretrain import PretrainConfig
from utils.cli import (
    ArgumentParser,
    CheckpointOptions,
    add_dataclass_flags,
    closest,
    dataclass_values,
    read_flag_value,
)
from utils.fields import option


def _parse_float(text: str) -> float:
    return float(text.rstrip("%")) / 100


@dataclass(frozen=True)
class Demo:
    flag: bool = option(False, "a boolean", group="data")
    count: int = option(3, "an integer", group="data")
    rate: float = option(0.5, "a float", group="data")
    sizes: tuple[int, ...] = option((3,), "integers", group="data")
    words: tuple[str, ...] = option(("a",), "words", group="data")
    names: tuple[str, ...] = option((), "several values", nargs="+", group="data")
    mode: str = option("fast", "one of two", choices=("fast", "slow"), group="data")
    share: float = option(0.1, "a percentage", parse=_parse_float, group="data")


@pytest.mark.parametrize(("name", "text"), [("flag", "False"), ("flag", "yes"), ("count", "7"), ("rate", "1e-4"),
                                            ("sizes", "[2,4]"), ("sizes", "5"), ("words", "b,c"), ("names", "x"),
                                            ("mode", "slow"), ("share", "25%")])
def test_read_flag_value_reads_a_setting_as_its_flag_does(name: str, text: str) -> None:
    parser = ArgumentParser()
    add_dataclass_flags(parser, Demo)
    from_flag = dataclass_values(parser.parse_args([f"--{name}", text]), Demo)[name]
    field = next(f for f in fields(Demo) if f.name == name)
    assert read_flag_value(field, text) == from_flag


def test_read_flag_value_says_what_is_wrong() -> None:
    by_name = {f.name: f for f in fields(Demo)}
    for name, text, message in (("flag", "maybe", "expected True or False"), ("count", "many", "invalid literal"),
                                ("sizes", "[0]", "positive integers"), ("mode", "medium", r"choose one of \['fast'")):
        with pytest.raises(ValueError, match=message):
            read_flag_value(by_name[name], text)


def test_closest_finds_the_one_close_name_or_none() -> None:
    assert closest("num_epoch", ["num_epochs", "lr", "batch_size"]) == "num_epochs"
    assert closest("photo.jpeg", ["photo.jpg", "other.png"]) == "photo.jpg"
    assert closest("zzz", ["num_epochs", "lr"]) is None


@dataclass(frozen=True)
class Convert:
    images_path: str = option("", "images", aliases=("--images",), group="data")
    split: str = option("", "one split", group="data")
    split_ratio: str = option("", "shares", group="data")


def _commands() -> ArgumentParser:
    parser = ArgumentParser(prog="tool")
    sub = parser.add_subparsers(dest="command", required=True)
    add_dataclass_flags(sub.add_parser("convert"), Convert, exclusive=("split", "split_ratio"))
    add_dataclass_flags(sub.add_parser("other"), Demo)
    return parser


def test_a_mistyped_flag_is_matched_against_the_flags_of_its_sub_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _commands().parse_args(["convert", "--images_pth", "x"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "--images_pth: did you mean --images_path?" in err


def test_exclusive_flags_refuse_to_be_given_together(capsys: pytest.CaptureFixture[str]) -> None:
    assert _commands().parse_args(["convert", "--split", "train"]).split == "train"
    with pytest.raises(SystemExit):
        _commands().parse_args(["convert", "--split", "train", "--split_ratio", "1,0,0"])
    assert "argument --split_ratio: not allowed with argument --split" in capsys.readouterr().err


def test_export_reads_the_common_checkpoint_flags_its_old_name_and_true_false(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "best.pth"
    ckpt.write_bytes(b"not read by parse_config")
    cfg = export.parse_config(["--load_path", str(ckpt), "--output", "out", "--features_only", "False"])
    assert (cfg.checkpoint, cfg.output_path, cfg.format, cfg.features_only) == ((str(ckpt),), "out", "onnx", False)
    assert export.parse_config(["--checkpoint", str(ckpt), "--output", "o", "--features_only"]).features_only
    for argv, message in ((["--checkpoint", str(ckpt), str(ckpt), "--output", "o"], "exports one model, got 2"),
                          (["--checkpoint", str(tmp_path / "none.pth"), "--output", "o"], "no such file"),
                          (["--checkpoint", str(ckpt), "--output", "o", "--opst", "17"], "did you mean --opset?")):
        with pytest.raises(SystemExit):
            export.parse_config(argv)
        assert message in capsys.readouterr().err


def test_a_single_checkpoint_path_is_refused_rather_than_read_as_its_characters() -> None:
    assert CheckpointOptions(checkpoint=("best.pth",)).checkpoint == ("best.pth",)
    with pytest.raises(TypeError, match=r"checkpoint takes a tuple of paths .*checkpoint=\(path,\)"):
        CheckpointOptions(checkpoint="best.pth")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="checkpoint takes a tuple"):
        export.ExportConfig("best.pth", output_path="out")  # type: ignore[arg-type]


def test_every_script_names_what_it_writes_output_path_with_the_older_names_as_aliases():
    """One family of names for output locations: the field (and flag) is output_path everywhere a script writes a
    file or folder; --output, --out and --output_dir still read, as aliases."""
    writers = {backbone.CreateConfig: ("--output",), backbone.ConvertConfig: ("--output",),
               export.ExportConfig: ("--output",), demo.DemoConfig: ("--output",),
               captions.ToManifestConfig: ("--output",),
               synthetic._Command: ("--out",), test_script.TestConfig: ("--output_dir",), GeneratorConfig: (),
               PretrainConfig: ()}
    for cls, aliases in writers.items():
        named = {f.name: f for f in fields(cls)}
        assert "output_path" in named and not {"output", "out", "output_dir"} & set(named), cls.__name__
        assert named["output_path"].metadata["aliases"] == aliases, cls.__name__
