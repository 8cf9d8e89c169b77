"""The command-line vocabulary shared by the root scripts: one name and one meaning per setting.

- argument types that read the seed's spellings (booleans as True/False, lists as [3]), and `read_flag_value`, which
  reads a setting's text as its flag would (pipeline.py --set);
- `ArgumentParser`: flag groups in a fixed order (data, model, optimisation, evaluation, runtime), no abbreviations,
  and a one-line error with a "did you mean" suggestion for a mistyped flag (`closest`, the one did-you-mean, a few
  typing edits away at most) or, for a flag of the reference's scripts that the script lacks, its name here
  (`FOREIGN_FLAGS`);
- flags generated from `utils.fields.option(...)` dataclass fields, so a config class is the only home of a setting;
- the settings several scripts take, as small option dataclasses a script config inherits (ModelSourceOptions,
  CheckpointOptions, LengthOptions here, RuntimeOptions in utils.runtime), with the seed's and the reference's
  spellings as aliases.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, Field, dataclass
from typing import Any, TypeVar

from utils.fields import described_fields, option

T = TypeVar("T")

GROUP_ORDER = ("data", "model", "optimisation", "evaluation", "runtime")


def str2bool(value: str | bool) -> bool:
    """'True'/'False' (and 1/0, yes/no) as the seed's command lines write them."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes", "y"):
        return True
    if value.lower() in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def int_list(value: str) -> tuple[int, ...]:
    """'[3]', '3', '3,5' or '[3, 5]' -> (3,) / (3, 5)."""
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        try:
            parsed = [int(x) for x in value.replace("[", "").replace("]", "").split(",") if x.strip()]
        except ValueError:
            parsed = []
    parsed = [parsed] if isinstance(parsed, int) else list(parsed) if isinstance(parsed, (list, tuple)) else []
    if not parsed or not all(isinstance(x, int) and x > 0 for x in parsed):
        raise argparse.ArgumentTypeError(f"expected a list of positive integers like [3] or 3,5, got {value!r}")
    return tuple(parsed)


def _str_tuple(value: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b')."""
    return tuple(value.split(","))


def closest(name: str, known: Iterable[str], max_edits: int | None = None) -> str | None:
    """The known name most like a mistyped one (difflib's similarity at least 0.6), or None: the one "did you mean"
    behind flags, --set keys and file names. With max_edits, only a name that many typing edits away at most (a
    letter added, dropped, changed or two swapped; '-' and '_' alike) qualifies: a flag that merely shares a word
    with another (--show_predictions, --predictions_only) means something else."""
    candidates = list(known)
    if max_edits is not None:
        candidates = [k for k in candidates if typing_edits(name, k) <= max_edits]
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return match[0] if match else None


def typing_edits(a: str, b: str) -> int:
    """Letters added, dropped, changed or swapped with a neighbour to type b instead of a (optimal string alignment
    distance), ignoring case and counting '-' and '_' as one."""
    a, b = a.lower().replace("-", "_"), b.lower().replace("-", "_")
    before, row = None, list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            current[j] = min(row[j] + 1, current[j - 1] + 1, row[j - 1] + (x != y))
            if before is not None and i > 1 and j > 1 and x == b[j - 2] and a[i - 2] == y:
                current[j] = min(current[j], before[j - 2] + 1)
        before, row = row, current
    return row[-1]


def flag_typo_budget(flag: str) -> int:
    """Typing edits a mistyped flag may be from the one it meant: 1, plus 1 per 8 letters of its name."""
    return 1 + len(flag.lstrip("-")) // 8


@dataclass(frozen=True)
class ForeignFlag:
    """A flag of the reference's scripts that a script here may not declare: what it meant there, the flags that mean
    the same here (the first the script has is named), else what to do instead."""

    meaning: str
    same: tuple[str, ...] = ()
    instead: str = ""

    def answer(self, flag: str, declared: Iterable[str]) -> str:
        """One sentence for a command line that gave `flag` to a script declaring `declared`."""
        here = next((f for f in self.same if f in set(declared)), None)
        if here:
            return f"{flag} (the reference's {self.meaning}) is {here} here"
        return f"{flag} (the reference's {self.meaning}) has no equivalent here: {self.instead or 'not used'}"


# Flags of the reference's scripts that some script here does not declare (those a script takes with the reference's
# meaning are aliases of its fields): answered, never guessed at, since a similar name may mean something else here.
FOREIGN_FLAGS: dict[str, ForeignFlag] = {
    "--eval_parallel_batch_size": ForeignFlag("number of images decoded together",
                                              ("--eval_batch_size", "--batch_size")),
    "--preproc_images_hdf5_filepath": ForeignFlag(
        "HDF5 file of pre-resized images", instead="images are decoded from --images_path by --num_workers "
        "processes; to decode them only once, cache their features with data_generator.py and pass --features_path"),
    "--max_seq_len": ForeignFlag(
        "longest caption a model holds", instead="the model's length comes from the training captions (the "
        "longest + 20, as the reference); --scst_max_len and --eval_max_len cap sampled and validation captions"),
}


def flag_type(f: Field) -> Callable[[str], Any]:
    """How an option(...) field's flag reads one value: the field's parse, True/False for a bool, a list of positive
    integers for a tuple of ints ([3] or 3,5), comma-separated words for another tuple, else the default's type (each
    item of a several-value flag is read as a string unless the field says how)."""
    meta, default = f.metadata, f.default if f.default is not MISSING else None
    if meta["parse"]:
        return meta["parse"]
    if meta["nargs"] or default is None:
        return str
    if isinstance(default, bool):
        return str2bool
    if isinstance(default, tuple):
        return int_list if all(isinstance(x, int) for x in default) else _str_tuple
    return type(default)


def read_flag_value(f: Field, text: str) -> Any:
    """A setting's value from its text, read as its flag reads it (a several-value flag's items comma-separated);
    a ValueError says what is wrong, with the choices when the value is not one of them."""
    read = flag_type(f)
    try:
        value = tuple(read(item) for item in text.split(",")) if f.metadata["nargs"] else read(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None
    choices = f.metadata["choices"]
    if choices and any(v not in choices for v in (value if f.metadata["nargs"] else (value,))):
        raise ValueError(f"choose one of {list(choices)}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse with named flag groups in a fixed order and short errors that suggest the flag a user meant (among
    the flags of the sub-command the command line names, if any)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self._groups = {name: self.add_argument_group(name) for name in GROUP_ORDER}
        self.argv: list[str] = []  # the command line being parsed

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self.argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self.argv, namespace)

    def group(self, name: str) -> argparse._ArgumentGroup:
        """The flag group called name (data, model, optimisation, evaluation or runtime)."""
        return self._groups[name]

    def format_help(self) -> str:
        used = [g for g in self._action_groups if g._group_actions or g.title not in self._groups]
        hidden = [g for g in self._action_groups if g not in used]
        for g in hidden:
            self._action_groups.remove(g)
        try:
            return super().format_help()
        finally:
            self._action_groups.extend(hidden)

    def command_parser(self) -> argparse.ArgumentParser:
        """The parser of the sub-command the command line names, or this parser."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return next((action.choices[arg] for arg in self.argv if arg in action.choices), self)
        return self

    def flag_hints(self, message: str) -> str:
        """For each unrecognized flag of an argparse error message: what a flag of the seed's or the reference's
        scripts is called here (FOREIGN_FLAGS), else '--num_epoch: did you mean --num_epochs?' when a flag of the
        command is a typo away ('' when none is)."""
        unknown = re.findall(r"(--?[\w-]+)", message.split(":", 1)[-1]) if "unrecognized" in message else []
        known = [flag for flag in self.command_parser()._option_string_actions if flag.startswith("--")]
        hints = []
        for flag in (f.split("=")[0] for f in unknown):
            if flag in FOREIGN_FLAGS:
                hints.append(FOREIGN_FLAGS[flag].answer(flag, known))
            elif match := closest(flag, known, max_edits=flag_typo_budget(flag)):
                hints.append(f"{flag}: did you mean {match}?")
        return ("; " + "; ".join(hints)) if hints else ""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}{self.flag_hints(message)}\n"
                     f"(python {self.prog} --help lists every option)\n")


def add_bool(group: argparse._ActionsContainer, *names: str, default: bool | None, help: str,
             dest: str | None = None) -> None:
    """A boolean flag that reads `--flag`, `--flag True` and `--flag False` alike."""
    group.add_argument(*names, dest=dest, type=str2bool, nargs="?", const=True, default=default, metavar="True|False",
                       help=help)


def add_dataclass_flags(parser: ArgumentParser, cls: type, *, unset_default: bool = False,
                        notes: dict[str, str] | None = None, skip: tuple[str, ...] = (),
                        exclusive: tuple[str, ...] = ()) -> None:
    """One flag per option(...) field of cls (inherited ones included), in the field's help group; the field name
    is always the dest.

    With unset_default the flags default to None ("not given"), so a preset or a checkpoint can supply the value;
    the help still shows the dataclass default. notes adds a remark to a field's help. Of the fields named in
    exclusive, a command line may give one at most.
    """
    either: argparse._MutuallyExclusiveGroup | None = None
    for f in described_fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        primary = meta["flag"] or f.name
        names = list(dict.fromkeys([f"--{primary}", *meta["aliases"], f"--{f.name}"]))
        default = f.default if f.default is not MISSING else None
        note = f"; {notes[f.name]}" if notes and f.name in notes else ""
        shown = "" if "default:" in meta["help"] or meta["required"] else f"default: {_show(default)}"
        help_text = meta["help"] + (f" ({shown}{note})" if shown or note else "").replace("(; ", "(")
        group: argparse._ActionsContainer = parser.group(meta["group"] or "runtime")
        if f.name in exclusive:
            either = either or group.add_mutually_exclusive_group()
            group = either
        value = None if unset_default else default
        if isinstance(default, bool) or meta["parse"] is str2bool:  # str2bool with default None: True, False or unset
            add_bool(group, *names, dest=f.name, default=value, help=help_text)
            continue
        kwargs: dict[str, Any] = {"nargs": meta["nargs"], "required": meta["required"]}
        if meta["nargs"] and default == ():  # nothing to extend: a repeated flag adds to the list (--set a=1 --set b=2)
            kwargs["action"], value = "extend", None
        group.add_argument(*names, dest=f.name, type=flag_type(f), default=value, choices=meta["choices"],
                           help=help_text, metavar=None if meta["choices"] else primary.upper(), **kwargs)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(str(v) for v in value) + "]"
    return repr(value) if value == "" else str(value)


def dataclass_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The parsed values of cls's flags, by field name (lists become tuples; None where a flag was not given and
    had no default)."""
    values = {f.name: getattr(args, f.name) for f in described_fields(cls) if hasattr(args, f.name)}
    for f in described_fields(cls):
        if values.get(f.name) is None and f.default == ():
            values[f.name] = ()
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def parse_dataclass(cls: type[T], argv: list[str] | None, description: str | None = None,
                    ignored: tuple[str, ...] = ()) -> tuple[T, ArgumentParser]:
    """A script's config from its command line: every option(...) field of cls as a flag (plus the `ignored`
    legacy flags); returns the config and the parser, whose error() reports a problem found afterwards."""
    parser = ArgumentParser(description=description)
    add_dataclass_flags(parser, cls)
    add_ignored_flags(parser, *ignored)
    return cls(**dataclass_values(parser.parse_args(argv), cls)), parser


def add_ignored_flags(parser: ArgumentParser, *names: str) -> None:
    """Flags the seed's or the reference's commands pass that mean nothing here (the checkpoint describes its
    model): accepted, hidden from --help, ignored."""
    for name in names:
        parser.group("runtime").add_argument(name, default=None, help=argparse.SUPPRESS)


@dataclass(frozen=True)
class ModelSourceOptions:
    """The model a script reads: --checkpoint (the seed's test.py --save_model_path and the reference's demo.py
    --load_path are aliases) and the vocabulary an official checkpoint needs."""

    checkpoint: tuple[str, ...] = option(
        (), "the model to read: a training checkpoint (best.pth), a saved model folder, an exported ONNX folder, or "
        "the official ExpansionNet v2 release (with --vocab); several make an ensemble", required=True, nargs="+",
        aliases=("--load_path", "--save_model_path"), group="model")
    vocab: str = option("", "vocabulary file (JSON, or the official demo_coco_tokens.pickle); only the official "
                        "checkpoint needs it", aliases=("--vocab_path",), group="model")

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint, tuple):  # one path would be read as a tuple of its characters
            raise TypeError(f"checkpoint takes a tuple of paths (several make an ensemble), got {self.checkpoint!r}; "
                            "build the config with keywords, e.g. checkpoint=(path,)")


@dataclass(frozen=True)
class CheckpointOptions(ModelSourceOptions):
    """The model a script reads and decodes with: ModelSourceOptions, and which runtime decodes and how."""

    backend: str = option("auto", "what decodes: auto (ONNX Runtime for an exported ONNX folder, PyTorch for "
                          "everything else: no export is ever started on its own), torch or onnx (exports once per "
                          "weights into --onnx_cache)", choices=("auto", "torch", "onnx"), group="runtime")
    onnx_cache: str = option("", "folder of the ONNX exports ONNX Runtime runs, made once per weights (default: "
                             "$XDG_CACHE_HOME or ~/.cache, /expansionnet/onnx)", group="runtime")
    compile: bool = option(False, "torch.compile the encoder and the decoding step (PyTorch backend): compiles once "
                           "per batch shape, worth it on a GPU for many batches", group="runtime")


@dataclass(frozen=True)
class LengthOptions:
    """The length cap of generated captions, in our words (--max_len) or the reference's (--max_seq_len)."""

    max_len: int = option(0, "most tokens to generate per caption, EOS included (default: 0, the model's capacity "
                          "max_seq_len - 1, as the reference decodes)", group="evaluation")
    max_seq_len: int = option(0, "the reference's length cap: it counts SOS, so N allows N - 1 generated tokens "
                              "(default: 0, not given)", group="evaluation")


def resolve_max_len(lengths: LengthOptions, capacity: int) -> int:
    """Generated-token cap from --max_len or the reference's --max_seq_len (0: not given), clipped to the model's
    capacity (max_seq_len - 1 positions after SOS)."""
    if lengths.max_len and lengths.max_seq_len:
        raise ValueError("give --max_len (generated tokens) or --max_seq_len (the reference's, SOS counted), not both")
    if not lengths.max_len and not lengths.max_seq_len:
        return capacity
    cap = lengths.max_len or lengths.max_seq_len - 1
    if cap < 1:
        given = f"--max_len {lengths.max_len}" if lengths.max_len else f"--max_seq_len {lengths.max_seq_len}"
        raise ValueError(f"the length cap must allow at least one generated token, got {given}")
    return min(cap, capacity)


def plain_warnings() -> None:
    """Show library warnings as one line, 'warning: message', without the Python source line (for the root scripts;
    call it from a script's __main__ block, never at import)."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
