"""Vocabulary extension: new words get new rows in the word embedding and the output layer of a captioner's state
dict, appended after every existing row (old token ids and their weights are kept).

The new output rows start as the mean of the old rows, their bias Δ nats below the old biases' mean. Each new word's
logit is then the mean of the old words' logits minus Δ, for every decoder state h (the output layer is linear in its
rows), and by Jensen's inequality exp(mean logit) <= the old words' mean probability mass: all K new words together
hold at most K e^-Δ / V_old of it. With Δ = ln(K / V_old) + 10 ln 2 that is 2^-10: each new word's logit is below
the old words' mean logit (so below the best old word's: greedy decoding is unchanged) and together they hold under
0.1% of the mass, so the model's captions are the ones it gave before, until training moves the rows.

Why not smaller: an Adam-type optimiser moves a bias by about lr per step, so a new word starting far below the old
ones cannot climb into the captions in a short fine-tuning. At 2^-24 (Δ about 16 nats) the quickstart's captioner
fine-tuned on 240 shifted-domain images (90 XE steps at lr 1e-3) never said one new word: colour + shape right 34%.
"""

from __future__ import annotations

import math

import torch

EMBEDDING = "out_embedder.embed.weight"  # (V, D) the decoder's input word embedding
OUTPUT_WEIGHT = "vocab_linear.weight"  # (V, D) the output layer
OUTPUT_BIAS = "vocab_linear.bias"  # (V,)
WORD_ROWS = (EMBEDDING, OUTPUT_WEIGHT, OUTPUT_BIAS)
NEGLIGIBLE_MASS = 2.0 ** -10  # what the new words may hold of the old words' probability mass before training


def new_word_margin(num_old: int, num_new: int) -> float:
    """Δ, in nats: how far below the old biases' mean the new output biases start (module docstring)."""
    return math.log(num_new / num_old) - math.log(NEGLIGIBLE_MASS)


def extend_word_rows(state: dict[str, torch.Tensor], num_new: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A copy of a captioner's state dict with num_new words appended to its vocabulary-sized tensors.

    The new embedding rows are drawn around the old rows' mean with their per-dimension spread (seeded, so a run is
    reproducible; distinct, so the decoder tells the new words apart from the first step); the new output rows are
    the old rows' mean and their bias the mean minus new_word_margin.
    """
    missing = [k for k in WORD_ROWS if k not in state]
    if missing:
        raise KeyError(f"not a captioner state dict: {', '.join(missing)} missing")
    if num_new <= 0:
        return dict(state)
    embedding, weight, bias = (state[k] for k in WORD_ROWS)
    num_old = weight.shape[0]
    if embedding.shape[0] != num_old or bias.shape[0] != num_old:
        raise ValueError(f"word rows disagree: embedding {tuple(embedding.shape)}, output {tuple(weight.shape)}, "
                         f"bias {tuple(bias.shape)}")
    generator = torch.Generator().manual_seed(seed)
    mean, spread = embedding.float().mean(0), embedding.float().std(0)
    noise = torch.randn(num_new, embedding.shape[1], generator=generator)
    new_embedding = (mean + noise * spread).to(embedding.dtype)  # (K, D)
    new_weight = weight.float().mean(0, keepdim=True).expand(num_new, -1).to(weight.dtype)  # (K, D)
    margin = new_word_margin(num_old, num_new)
    new_bias = torch.full((num_new,), bias.float().mean().item() - margin, dtype=bias.dtype)  # (K,)
    out = dict(state)
    out[EMBEDDING] = torch.cat([embedding, new_embedding])
    out[OUTPUT_WEIGHT] = torch.cat([weight, new_weight])
    out[OUTPUT_BIAS] = torch.cat([bias, new_bias])
    return out
