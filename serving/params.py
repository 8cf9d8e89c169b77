"""Decoding parameters: the query parameters of each route family, and their resolution against settings and model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Query, Request

from serving.backend import Backend, CaptionParams
from serving.errors import plain_text
from serving.schemas import HFParameters
from serving.settings import ServingSettings

OUR_NAMES = ("beam_size", "max_len", "num_captions", "repetition_penalty", "no_repeat_ngram_size")
HF_NAMES = ("num_beams", "max_new_tokens", "num_return_sequences", "repetition_penalty", "no_repeat_ngram_size")
PENALTY_RANGE = (1.0, 10.0)
NGRAM_RANGE = (0, 10)


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


def query_params(
    beam_size: int | None = Query(None, ge=1, description="beam width (at most the server's max_beam_size)"),
    max_len: int | None = Query(None, ge=1, description="maximum caption tokens (at most max_len_limit, see /ready)"),
    num_captions: int | None = Query(None, ge=1, description="captions per image (at most the beam width)"),
    repetition_penalty: float | None = Query(None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1], allow_inf_nan=False,
                                             description="(BLIP) >1 discourages repeats"),
    no_repeat_ngram_size: int | None = Query(None, ge=NGRAM_RANGE[0], le=NGRAM_RANGE[1],
                                             description="(BLIP) forbid repeated n-grams of this size"),
    _: None = Depends(only_query(*OUR_NAMES)),
) -> RawParams:
    """/predict, /predicts and /captioned: our parameter names."""
    return RawParams(beam_size, max_len, num_captions, repetition_penalty, no_repeat_ngram_size)


def hf_query_params(
    num_beams: int | None = Query(None, ge=1),
    max_new_tokens: int | None = Query(None, ge=1),
    num_return_sequences: int | None = Query(None, ge=1),
    repetition_penalty: float | None = Query(None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1], allow_inf_nan=False),
    no_repeat_ngram_size: int | None = Query(None, ge=NGRAM_RANGE[0], le=NGRAM_RANGE[1]),
    _: None = Depends(only_query(*HF_NAMES)),
) -> RawParams:
    """/v1/caption: the Hugging Face parameter names."""
    return RawParams(num_beams, max_new_tokens, num_return_sequences, repetition_penalty, no_repeat_ngram_size)


def hf_body_params(parameters: HFParameters | None) -> RawParams:
    """The ``parameters`` object of a Hugging Face JSON request."""
    p = parameters or HFParameters()
    return RawParams(p.num_beams, p.max_new_tokens, p.num_return_sequences, p.repetition_penalty,
                     p.no_repeat_ngram_size)


def resolve_params(raw: RawParams, settings: ServingSettings, backend: Backend) -> CaptionParams:
    """Defaults filled in and every bound checked (one 422 listing each problem), the model's own limits included."""
    beam = raw.beam_size if raw.beam_size is not None else max(settings.beam_size, raw.num_captions or 1)
    num = raw.num_captions if raw.num_captions is not None else settings.num_captions
    len_limit = min(settings.max_len_limit, backend.max_len)
    max_len = raw.max_len if raw.max_len is not None else min(settings.max_len, len_limit)
    penalty = 1.0 if raw.repetition_penalty is None else raw.repetition_penalty
    ngram = 0 if raw.no_repeat_ngram_size is None else raw.no_repeat_ngram_size
    problems = []
    if not 1 <= beam <= settings.max_beam_size:
        problems.append(f"beam size must be between 1 and {settings.max_beam_size}, got {beam}")
    if not 1 <= num <= beam:
        problems.append(f"number of captions must be between 1 and the beam size ({beam}), got {num}")
    if not 1 <= max_len <= len_limit:
        problems.append(f"maximum length must be between 1 and {len_limit}, got {max_len}")
    if not PENALTY_RANGE[0] <= penalty <= PENALTY_RANGE[1]:
        problems.append(f"repetition_penalty must be between {PENALTY_RANGE[0]:g} and {PENALTY_RANGE[1]:g}, "
                        f"got {penalty}")
    if not NGRAM_RANGE[0] <= ngram <= NGRAM_RANGE[1]:
        problems.append(f"no_repeat_ngram_size must be between {NGRAM_RANGE[0]} and {NGRAM_RANGE[1]}, got {ngram}")
    if problems:
        raise HTTPException(422, "; ".join(problems))
    params = CaptionParams(beam, max_len, num, penalty, ngram)
    try:
        backend.check_params(params)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    return params
