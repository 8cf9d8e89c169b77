"""Decoding parameters: the query parameters of each route family, the limits a request must keep (enforced here and
published by /openapi.json, see serving.openapi), and their resolution against settings and model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Query, Request

from serving.backend import Backend, CaptionParams
from serving.errors import plain_text
from serving.schemas import HFParameters
from serving.settings import ServingSettings
from utils.cli import LengthOptions, resolve_max_len

OUR_NAMES = ("beam_size", "max_len", "num_captions", "repetition_penalty", "no_repeat_ngram_size")
HF_NAMES = ("num_beams", "max_new_tokens", "num_return_sequences", "repetition_penalty", "no_repeat_ngram_size")
OUR_NAME = dict(zip(HF_NAMES, OUR_NAMES))  # a Hugging Face parameter name -> ours
PENALTY_RANGE = (1.0, 10.0)
NGRAM_RANGE = (0, 10)


@dataclass(frozen=True)
class RequestLimits:
    """What a request may ask for on this server: the bounds resolve_params enforces and /openapi.json publishes."""

    max_beam_size: int
    max_len: int | None  # longest caption a client may ask for; None: no limit is known until the model is loaded
    max_files: int
    repetition_controls: bool  # whether the model takes repetition_penalty and no_repeat_ngram_size

    @classmethod
    def of(cls, settings: ServingSettings, model_max_len: int | None, repetition_controls: bool) -> RequestLimits:
        """The settings' limits, with max_len capped by the model's full length once it is known."""
        caps = [cap for cap in (settings.max_len_limit, model_max_len) if cap]
        return cls(settings.max_beam_size, min(caps) if caps else None, settings.max_files, repetition_controls)

    def bounds(self) -> dict[str, tuple[float, float | None]]:
        """(minimum, maximum) of each decoding parameter a client may send, by our names and the Hugging Face ones;
        num_captions is also at most the beam size (the one rule between two parameters)."""
        ours: dict[str, tuple[float, float | None]] = {
            "beam_size": (1, self.max_beam_size), "max_len": (1, self.max_len), "num_captions": (1, self.max_beam_size)}
        if self.repetition_controls:
            ours |= {"repetition_penalty": PENALTY_RANGE, "no_repeat_ngram_size": NGRAM_RANGE}
        return ours | {hf: ours[name] for hf, name in OUR_NAME.items() if name in ours}


@dataclass
class RawParams:
    """Decoding parameters as the client gave them (None: server default)."""

    beam_size: int | None = None
    max_len: int | None = None
    num_captions: int | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None

    def merged(self, other: RawParams) -> RawParams:
        """These values, overridden by the ones set in other."""
        return RawParams(*(b if b is not None else a for a, b in zip(vars(self).values(), vars(other).values())))


def only_query(*names: str) -> Callable[[Request], None]:
    """A dependency refusing (422) query parameters other than ``names``: a typo must not be silently ignored."""
    allowed = frozenset(names)

    def check(request: Request) -> None:
        unknown = sorted(set(request.query_params) - allowed)
        if unknown:
            listed = ", ".join(repr(plain_text(name, 40)) for name in unknown[:10])
            raise HTTPException(422, f"unknown query parameters [{listed}]; accepted: {sorted(allowed)}")

    return check


# Bounds are not declared here: they depend on the settings and the model, so resolve_params checks them and
# serving.openapi publishes them, both from RequestLimits.
def query_params(
    beam_size: int | None = Query(None, description="beam width"),
    max_len: int | None = Query(None, description="most tokens to generate per caption, EOS included"),
    num_captions: int | None = Query(None, description="captions per image, best first: at most the beam width (the "
                                                       "beam widens to num_captions when beam_size is not given)"),
    repetition_penalty: float | None = Query(None, allow_inf_nan=False, description=">1 discourages repeats"),
    no_repeat_ngram_size: int | None = Query(None, description="forbid repeated n-grams of this size (0: off)"),
    _: None = Depends(only_query(*OUR_NAMES)),
) -> RawParams:
    """/predict, /predicts and /captioned: our parameter names."""
    return RawParams(beam_size, max_len, num_captions, repetition_penalty, no_repeat_ngram_size)


def hf_query_params(
    num_beams: int | None = Query(None, description="beam width"),
    max_new_tokens: int | None = Query(None, description="most tokens to generate, EOS included"),
    num_return_sequences: int | None = Query(None, description="captions, best first: at most num_beams (the beam "
                                                               "widens to it when num_beams is not given)"),
    repetition_penalty: float | None = Query(None, allow_inf_nan=False, description=">1 discourages repeats"),
    no_repeat_ngram_size: int | None = Query(None, description="forbid repeated n-grams of this size (0: off)"),
    _: None = Depends(only_query(*HF_NAMES)),
) -> RawParams:
    """/v1/caption: the Hugging Face parameter names."""
    return RawParams(num_beams, max_new_tokens, num_return_sequences, repetition_penalty, no_repeat_ngram_size)


def hf_body_params(parameters: HFParameters | None) -> RawParams:
    """The ``parameters`` object of a Hugging Face JSON request."""
    p = parameters or HFParameters()
    return RawParams(p.num_beams, p.max_new_tokens, p.num_return_sequences, p.repetition_penalty,
                     p.no_repeat_ngram_size)


LABELS = {name: f"{name} ({hf})" if hf != name else name for hf, name in OUR_NAME.items()}  # ours, as errors say


def resolve_params(raw: RawParams, settings: ServingSettings, backend: Backend, limits: RequestLimits
                   ) -> CaptionParams:
    """Defaults filled in and every bound of ``limits`` checked (one 422 listing each problem), then the model's own
    check. Not given: beam_size is the default widened to num_captions, num_captions the default narrowed to the beam,
    max_len the default (0: the longest allowed, as demo.py decodes)."""
    assert limits.max_len is not None, "requests are resolved once the model is loaded"
    problems = [f"{LABELS[name]} must be between {low:g} and {high:g}, got {value}"
                for name, (low, high) in limits.bounds().items()
                if name in LABELS and (value := getattr(raw, name)) is not None and not low <= value <= high]
    beam = raw.beam_size if raw.beam_size is not None else max(settings.beam_size, raw.num_captions or 1)
    num = raw.num_captions if raw.num_captions is not None else min(settings.num_captions, beam)
    if not problems and num > beam:
        problems.append(f"{LABELS['num_captions']} must be at most the beam width ({LABELS['beam_size']} {beam}), "
                        f"got {num}")
    if problems:
        raise HTTPException(422, "; ".join(problems))
    max_len = raw.max_len if raw.max_len is not None else resolve_max_len(LengthOptions(max_len=settings.max_len),
                                                                          limits.max_len)
    penalty = CaptionParams.repetition_penalty if raw.repetition_penalty is None else raw.repetition_penalty
    ngram = CaptionParams.no_repeat_ngram_size if raw.no_repeat_ngram_size is None else raw.no_repeat_ngram_size
    params = CaptionParams(beam, max_len, num, penalty, ngram)
    try:
        backend.check_params(params)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    return params
