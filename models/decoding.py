"""Search algorithms over a captioner: beam search, greedy search and multinomial sampling.

They see the model only through a Stepper (next-token log-probs, beam re-ordering): for an ExpansionNet, its
`init_cache` / `decode_step` (incremental, one position per step) or `decode` (full recomputation of the prefix, the
reference's way; `use_cache=False`); for ONNX Runtime sessions or an ensemble, the stepper their StepModel makes.
`memory` is whatever the model's encoder gave (a tensor for an ExpansionNet). Batched over images x hypotheses with
tensor operations; the only host-device sync per step is the "all finished?" check.
`max_len` counts generated tokens (EOS included, SOS not).
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.expansionnet import ExpansionNet
from utils.runtime import autocast


@dataclass
class SearchOutput:
    """tokens/logprobs (B, n, L): generated ids without SOS, PAD after EOS; scores (B, n): ranking scores;
    lengths (B, n): generated tokens including EOS."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    scores: torch.Tensor
    lengths: torch.Tensor


class Stepper(ABC):
    """Next-token log-probabilities for `batch` images x `group` hypotheses, one position per call.

    The search algorithms below only talk to this interface, so one algorithm runs over every way of computing a
    step: PyTorch (TorchStepper, cached or by full recomputation), ONNX Runtime (deploy.runtime.OrtStepper) or an
    ensemble of either (EnsembleStepper).
    """

    batch: int
    group: int
    device: torch.device

    @abstractmethod
    def logprobs(self, prefix: torch.Tensor, per_image: bool = False) -> torch.Tensor:
        """prefix (batch*group, t) of input tokens (SOS first) -> log-probs (batch*group, V) of token t, float32.
        per_image (the first call, where first_step_per_image): prefix (batch, 1) holds one row per image, the
        group's hypotheses being one until the first re-ordering, and so do the log-probs."""

    @abstractmethod
    def reorder(self, index: torch.Tensor) -> None:
        """Hypothesis r continues hypothesis index[r] (index (batch*group,), within its own image's group)."""

    first_step_per_image = False
    """Whether logprobs takes per_image=True: a beam search then computes its first step once per image."""

    def _check_per_image(self, per_image: bool) -> None:
        if per_image and not self.first_step_per_image:
            raise ValueError(f"{type(self).__name__} computes every hypothesis's first step (first_step_per_image "
                             "is False): give it one prefix per hypothesis")


class StepModel(Protocol):
    """Anything the searches can decode with besides an ExpansionNet: it makes a Stepper from its encoder output."""

    def stepper(self, memory: Any, key_mask: torch.Tensor | None, group: int, max_len: int) -> Stepper: ...


Compile = bool | str | Callable[..., Any]
"""A compile option: False (eager), True (torch.compile's default backend, inductor), or a torch.compile backend
(a name such as "aot_eager", or a backend function)."""

def compiled(method: str, option: Compile) -> Callable[..., Any]:
    """ExpansionNet.<method> (step, encode, decode) under torch.compile (option True: its default backend, else the
    backend `option` names), called as fn(model, ...). Made once per process and option and shared by every model
    and stepper: a compiled function per stepper would compile again for every batch."""
    return _compiled(method, option, torch.compile)  # torch.compile too: a test may substitute another one


@functools.cache
def _compiled(method: str, option: Compile, compile_fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = getattr(ExpansionNet, method)
    return compile_fn(fn) if option is True else compile_fn(fn, backend=option)


class TorchStepper(Stepper):
    """An ExpansionNet in PyTorch: incremental (cached) steps, or the reference's recomputation of the whole prefix
    (use_cache=False); `precision` is the autocast of the step (fp32: none).

    compile: run the cached step compiled (see Compile), on fixed-size caches (models.cache.FixedExpansionCache) so
    that it compiles once for a batch shape rather than at every position; the captions are the eager ones up to
    the rounding of a differently ordered sum. Ignored with use_cache=False.
    reorders=False: a search that never calls `reorder` (sampling, greedy), whose caches need no ancestry.
    """

    def __init__(self, model: ExpansionNet, memory: torch.Tensor, key_mask: torch.Tensor | None, group: int,
                 max_len: int, use_cache: bool = True, precision: str = "fp32", compile: Compile = False,
                 reorders: bool = True) -> None:
        self.model = model
        self.use_cache = use_cache
        self.batch, self.group, self.device = memory.shape[0], group, memory.device
        self.precision = precision
        self.step: Callable[..., torch.Tensor] | None = None
        if use_cache:
            if compile:
                step = compiled("step", compile)
                self.step = lambda *args: step(model, *args)
            with autocast(self.device, precision):  # the cross-attention projections run at the steps' precision
                self.cache = model.init_cache(memory, key_mask, group, max_len, fixed=self.step is not None,
                                              reorders=reorders)
            self.first_step_per_image = self.cache.can_share_first_step
        else:
            self.memory = memory.repeat_interleave(group, dim=0)
            self.key_mask = key_mask.repeat_interleave(group, dim=0) if key_mask is not None else None

    def logprobs(self, prefix: torch.Tensor, per_image: bool = False) -> torch.Tensor:
        self._check_per_image(per_image)
        with autocast(self.device, self.precision):
            if self.use_cache:
                if per_image:
                    self.cache.share_first_step()
                tokens = prefix[:, -1]  # a view of the prefix, whose stride grows with it: a compiled step would
                if self.step is not None:  # take each step's view for a new input layout, so it gets a fresh copy
                    tokens = tokens.clone()
                logits = self.model.decode_step(tokens, self.cache, step=self.step)
            else:
                logits = self.model.decode(prefix, self.memory, self.key_mask)[:, -1]
        return F.log_softmax(logits.float(), dim=-1)

    def reorder(self, index: torch.Tensor) -> None:
        if self.use_cache:
            self.cache.reorder(index)


class EnsembleStepper(Stepper):
    """Members' word probabilities averaged at every step (the reference's ensemble): log(mean_i softmax_i).

    Each member keeps its own caches and follows the same re-orderings; its log-probs are moved to the first
    member's device. A single member gives its own log-probs unchanged.
    """

    def __init__(self, members: Sequence[Stepper]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)
        first = self.members[0]
        if any(m.batch != first.batch or m.group != first.group for m in self.members):
            raise ValueError("ensemble members decode different batches")
        self.batch, self.group, self.device = first.batch, first.group, first.device

    def logprobs(self, prefix: torch.Tensor, per_image: bool = False) -> torch.Tensor:
        self._check_per_image(per_image)
        logps = [m.logprobs(prefix.to(m.device), per_image).to(self.device) for m in self.members]
        if len(logps) == 1:
            return logps[0]
        return torch.logsumexp(torch.stack(logps), dim=0) - math.log(len(logps))

    def reorder(self, index: torch.Tensor) -> None:
        for m in self.members:
            m.reorder(index.to(m.device))

    @property
    def first_step_per_image(self) -> bool:
        return all(m.first_step_per_image for m in self.members)


def make_stepper(model: ExpansionNet | StepModel, memory: Any, key_mask: torch.Tensor | None, group: int,
                 max_len: int, use_cache: bool = True, compile: Compile = False, reorders: bool = True) -> Stepper:
    """The Stepper of an ExpansionNet (PyTorch, under the caller's autocast; compile and reorders: see
    TorchStepper) or of any StepModel (which decides for itself, e.g. deploy.runtime.TorchRuntime's compile
    option)."""
    if isinstance(model, nn.Module):
        return TorchStepper(model, memory, key_mask, group, max_len, use_cache, compile=compile, reorders=reorders)
    return model.stepper(memory, key_mask, group, max_len)


def _lengths(tokens: torch.Tensor, eos_idx: int) -> torch.Tensor:
    """Generated length including the first EOS (or the full length when there is none); tokens (..., L)."""
    L = tokens.shape[-1]
    is_eos = tokens == eos_idx
    first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full_like(tokens[..., 0], L - 1))
    return first + 1


@torch.no_grad()
def beam_search(model: ExpansionNet | StepModel, memory: Any, key_mask: torch.Tensor | None, *, sos_idx: int,
                eos_idx: int, pad_idx: int, beam_size: int = 5, max_len: int = 20, num_outputs: int = 1,
                use_cache: bool = True, compile: Compile = False) -> SearchOutput:
    """The reference's beam search: beam-many distinct first words, global top-beam by cumulative log-prob,
    finished hypotheses kept (they continue with log-prob 0) but can be pushed out, final ranking by cumulative
    log-prob divided by the number of tokens including SOS and EOS."""
    if not 1 <= num_outputs <= beam_size:
        raise ValueError(f"num_outputs must be between 1 and beam_size ({beam_size}), got {num_outputs}")
    k = beam_size
    stepper = make_stepper(model, memory, key_mask, k, max_len, use_cache, compile)
    B, device = stepper.batch, stepper.device
    prefix = torch.full((B * k, 1), sos_idx, dtype=torch.long, device=device)
    cum = torch.full((B, k), float("-inf"), device=device)
    cum[:, 0] = 0.0  # only beam 0 is live at the first step, so the first words are distinct
    finished = torch.zeros(B, k, dtype=torch.bool, device=device)
    tok_lps = torch.zeros(B, k, 0, device=device)
    batch_offset = (torch.arange(B, device=device) * k)[:, None]
    num_finished = 0
    for step in range(max_len):
        once = step == 0 and stepper.first_step_per_image  # the k hypotheses of an image are one so far
        logp = stepper.logprobs(prefix[::k], per_image=True) if once else stepper.logprobs(prefix)
        V = logp.shape[-1]
        logp = logp.view(B, -1, V)
        if once and V < k:  # then the first top-k reaches the dead slots' -inf scores too
            logp = logp.expand(B, k, V)
        if num_finished:  # a finished hypothesis goes on with PAD at log-prob 0
            done_row = torch.full((V,), float("-inf"), device=device)
            done_row[pad_idx] = 0.0
            logp = torch.where(finished[..., None], done_row, logp)
        top_scores, top_idx = _top_k((cum[..., None] + logp).view(B, k * V), k)
        src, tok = top_idx // V, top_idx % V
        index = (batch_offset + src).view(-1)
        step_lp = logp.reshape(B, -1).gather(1, top_idx)  # (once: every top index is in slot 0's words)
        prefix = torch.cat([prefix.index_select(0, index), tok.view(-1, 1)], dim=1)
        tok_lps = torch.cat([tok_lps.gather(1, src[..., None].expand(-1, -1, tok_lps.shape[-1])),
                             step_lp[..., None]], dim=-1)
        finished = finished.gather(1, src) | (tok == eos_idx)
        cum = top_scores
        stepper.reorder(index)
        num_finished = int(finished.sum())  # the step's one host-device sync
        if num_finished == finished.numel():
            break
    tokens = prefix[:, 1:].view(B, k, -1)
    lengths = _lengths(tokens, eos_idx)
    scores = cum / (lengths + 1).float()
    order = scores.argsort(dim=-1, descending=True)[:, :num_outputs]
    pick = order[..., None].expand(-1, -1, tokens.shape[-1])
    return SearchOutput(tokens.gather(1, pick), tok_lps.gather(1, pick), scores.gather(1, order),
                        lengths.gather(1, order))


def _top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores.topk(k, dim=-1) of scores (B, N), searched on the CPU among the k chunks (of c ~ sqrt(N / k) values)
    with the largest maxima, and the tail that fills no chunk: each of the k largest values lies there (else k
    other chunks' maxima would exceed it). N/c maxima then ~k*c values take a quarter of the time of a top-k over
    N (beam 5 x 10,000 words). Ties may come in another order, as between any two top-k implementations."""
    B, N = scores.shape
    c = math.isqrt(N // k)
    full = N - N % c
    if scores.device.type != "cpu" or c < 8 or full // c < 4 * k:
        return scores.topk(k, dim=-1)
    chunks = scores[:, :full].view(B, full // c, c)
    best = chunks.amax(-1).topk(k, dim=-1).indices  # (B, k) chunks
    candidates = chunks.gather(1, best[..., None].expand(-1, -1, c)).view(B, k * c)
    if full == N:
        values, within = candidates.topk(k, dim=-1)
        return values, best.gather(1, within // c) * c + within % c
    values, within = torch.cat((candidates, scores[:, full:]), dim=1).topk(k, dim=-1)
    in_chunk = best.gather(1, (within // c).clamp(max=k - 1)) * c + within % c
    return values, torch.where(within < k * c, in_chunk, within - k * c + full)


def _one_token_per_row(stepper: Stepper, choose: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], *,
                       sos_idx: int, eos_idx: int, pad_idx: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decodes every row of the stepper (batch*group) on its own, `choose(logp)` -> (token, its log-prob) per row
    from the log-probs (R, V); a row that has ended goes on with PAD at log-prob 0. Stops at max_len or when every
    row has ended. Returns tokens (R, L) (no SOS) and their log-probs (R, L)."""
    rows = stepper.batch * stepper.group
    prefix = torch.full((rows, 1), sos_idx, dtype=torch.long, device=stepper.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=stepper.device)
    lps = []
    for _ in range(max_len):
        tok, lp = choose(stepper.logprobs(prefix))
        tok = torch.where(finished, torch.full_like(tok, pad_idx), tok)
        lps.append(torch.where(finished, torch.zeros_like(lp), lp))
        prefix = torch.cat([prefix, tok[:, None]], dim=1)
        finished = finished | (tok == eos_idx)
        if bool(finished.all()):
            break
    return prefix[:, 1:], torch.stack(lps, dim=1)


def _arg_max(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lp, tok = logp.max(dim=-1)
    return tok, lp


@torch.no_grad()
def greedy_search(model: ExpansionNet | StepModel, memory: Any, key_mask: torch.Tensor | None, *, sos_idx: int,
                  eos_idx: int, pad_idx: int, max_len: int = 20, use_cache: bool = True, compile: Compile = False
                  ) -> SearchOutput:
    """Arg-max decoding; scored like beam search so beam_size=1 gives the same output."""
    stepper = make_stepper(model, memory, key_mask, 1, max_len, use_cache, compile, reorders=False)
    tokens, tok_lps = _one_token_per_row(stepper, _arg_max, sos_idx=sos_idx, eos_idx=eos_idx, pad_idx=pad_idx,
                                         max_len=max_len)
    lengths = _lengths(tokens, eos_idx)
    scores = tok_lps.sum(-1) / (lengths + 1).float()
    return SearchOutput(tokens[:, None], tok_lps[:, None], scores[:, None], lengths[:, None])


@torch.no_grad()
def sample(model: ExpansionNet | StepModel, memory: Any, key_mask: torch.Tensor | None, *, sos_idx: int,
           eos_idx: int, pad_idx: int, num_samples: int = 5, max_len: int = 20, use_cache: bool = True,
           generator: torch.Generator | None = None, compile: Compile = False) -> SearchOutput:
    """Ancestral sampling (temperature 1, full softmax) of num_samples captions per image, for SCST.

    Runs without gradient (the SCST loss re-scores the samples in one teacher-forced pass); dropout follows the
    model's mode. Returns tokens (B, num_samples, L).
    """
    k = num_samples
    stepper = make_stepper(model, memory, key_mask, k, max_len, use_cache, compile, reorders=False)

    def draw(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tok = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
        return tok, logp.gather(1, tok[:, None])[:, 0]

    tokens, tok_lps = _one_token_per_row(stepper, draw, sos_idx=sos_idx, eos_idx=eos_idx, pad_idx=pad_idx,
                                         max_len=max_len)
    B = stepper.batch
    tokens, tok_lps = tokens.view(B, k, -1), tok_lps.view(B, k, -1)
    lengths = _lengths(tokens, eos_idx)
    return SearchOutput(tokens, tok_lps, tok_lps.sum(-1), lengths)
