"""pipeline.py --set: change a preset's setting for every phase that has it (key=value) or for one (phaseN.key=value).

Keys are the flags of the phase's script (train.py, data_generator.py, backbone.py pretrain), checked against their
config classes before anything runs; values are read with the flag's own type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import Field, replace

from engine.features import GeneratorConfig
from engine.pipeline import Phase, Recipe
from engine.pretrain import PretrainConfig
from engine.setup import TrainConfig
from models.config import ModelConfig
from utils.cli import closest, read_flag_value
from utils.fields import described_fields

SCRIPT_CONFIGS: dict[str, tuple[type, ...]] = {
    "train.py": (TrainConfig, ModelConfig),
    "data_generator.py": (GeneratorConfig,),
    "backbone.py": (PretrainConfig,),
}
# set by the recipe itself (paths between phases, where each phase writes): an override would break the chain
MANAGED = frozenset({"images_path", "captions_path", "features_path", "body_save_path", "backbone", "save_path",
                     "run_name", "output_path", "reinforce", "is_end_to_end", "init_from"})


class OverrideError(ValueError):
    """A --set that names no setting of the phases, or a value its flag cannot read."""


def flags_of(phase: Phase) -> dict[str, Field]:
    """Every flag name (primary, field name and aliases) the phase's script takes -> its field."""
    out: dict[str, Field] = {}
    for cls in SCRIPT_CONFIGS[phase.command[0]]:
        for f in described_fields(cls):
            for name in (f.metadata["flag"] or f.name, f.name, *(a.lstrip("-") for a in f.metadata["aliases"])):
                out[name] = f
    return out


def parse_override(text: str) -> tuple[int | None, str, str]:
    """'phase2.num_epochs=1' -> (2, 'num_epochs', '1'); 'lr=1e-4' -> (None, 'lr', '1e-4')."""
    key, sep, value = text.partition("=")
    phase = None
    if key.startswith("phase") and "." in key:
        head, key = key.split(".", 1)
        phase = int(head[5:]) if head[5:].isdigit() else -1
    if not sep or not key or phase == -1:
        raise OverrideError(f"--set {text!r}: write key=value or phaseN.key=value (e.g. phase2.num_epochs=1)")
    return phase, key.lstrip("-"), value


def apply_overrides(recipe: Recipe, overrides: Sequence[str]) -> Recipe:
    """The recipe with every --set applied (phase-specific ones after the general ones)."""
    settings = {n: dict(s) for n, s in recipe.settings.items()}
    parsed = sorted((parse_override(t) + (t,) for t in overrides), key=lambda p: p[0] is not None)
    for phase_number, key, value, text in parsed:
        if key in MANAGED:
            raise OverrideError(f"--set {text!r}: {key} is set by the pipeline (it links the phases); give it as a "
                                "pipeline.py option where there is one")
        targets = [p for p in recipe.phases() if phase_number in (None, p.number)]
        if phase_number is not None and not targets:
            raise OverrideError(f"--set {text!r}: this recipe has no phase {phase_number}")
        hits = [p for p in targets if key in flags_of(p)]
        if not hits:
            known = sorted({k for p in targets for k in flags_of(p)})
            hint = closest(key, known)
            raise OverrideError(f"--set {text!r}: no phase takes a setting {key!r}"
                                + (f"; did you mean {hint}?" if hint else ""))
        for p in hits:
            f = flags_of(p)[key]
            name = f.metadata["flag"] or f.name
            for alias in {k for k, v in flags_of(p).items() if v is f}:
                settings[p.number].pop(alias, None)
            try:
                settings[p.number][name] = read_flag_value(f, value)
            except ValueError as e:
                raise OverrideError(f"--set {text!r}: {e}") from None
    return replace(recipe, settings=settings)
