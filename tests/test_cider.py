"""Behaviour of eval.cider.CiderD: equality with pycocoevalcap, the df_refs (SCST reward) mode, input checks, speed."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer, precook

from eval.cider import CiderD

WORDS = [f"w{i}" for i in range(40)] + ["a", "the", "on", "with"]


def _caption(rng: random.Random, low: int = 1, high: int = 12) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))


def _random_case(rng: random.Random, num_images: int) -> tuple[list[str], list[list[str]]]:
    """Random hyps/refs with the awkward cases mixed in: copies of a ref, empty, repeated words, 1..7 refs."""
    refs = [
        [_caption(rng, 0 if rng.random() < 0.05 else 1) for _ in range(rng.randint(1, 7))] for _ in range(num_images)
    ]
    hyps = []
    for image_refs in refs:
        u = rng.random()
        if u < 0.15:
            hyps.append(rng.choice(image_refs))
        elif u < 0.25:
            hyps.append("")
        elif u < 0.35:
            hyps.append(" ".join([rng.choice(WORDS)] * rng.randint(1, 6)))
        else:
            hyps.append(_caption(rng, 1, 16))
    if num_images > 3:  # two images with the same reference set must still count as two documents
        refs[1] = list(refs[0])
    return hyps, refs


def _pycoco(hyps: list[str], refs: list[list[str]], sigma: float = 6.0) -> np.ndarray:
    gts = {i: list(r) for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    _, scores = Cider(sigma=sigma).compute_score(gts, res)
    return np.asarray(scores)


def _forced_scorer(df_refs: list[list[str]], hyps: list[str], refs: list[list[str]]) -> np.ndarray:
    """pycocoevalcap's CiderScorer with document frequencies and log(N) forced to those of ``df_refs``."""
    log_n = math.log(float(len(df_refs)))

    class Forced(CiderScorer):
        ref_len = property(lambda self: log_n, lambda self, value: None)  # compute_cider's assignment is ignored

    df: dict[tuple[str, ...], float] = defaultdict(float)
    for image_refs in df_refs:
        for ngram in {g for r in image_refs for g in precook(r, 4)}:
            df[ngram] += 1.0
    scorer = Forced(n=4, sigma=6.0)
    for hyp, image_refs in zip(hyps, refs):
        scorer += (hyp, list(image_refs))
    scorer.document_frequency = df
    return np.asarray(scorer.compute_cider())


@pytest.mark.parametrize("seed", range(6))
def test_ciderd_equals_pycocoevalcap_on_random_captions(seed: int) -> None:
    rng = random.Random(seed)
    hyps, refs = _random_case(rng, rng.randint(2, 40))
    mean, scores = CiderD().score(hyps, refs)
    expected = _pycoco(hyps, refs)
    assert scores.shape == (len(hyps),)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-9)
    assert mean == pytest.approx(float(expected.mean()), abs=1e-9)


def test_ciderd_equals_pycocoevalcap_on_edge_cases() -> None:
    hyps = ["a man on a horse", "", "dog dog dog dog", "the cat", "w1 w2 w3 w1 w2 w3", "x"]
    refs = [
        ["a man on a horse", "a person riding a horse"],  # hypothesis equal to a reference
        ["a dog", "two dogs"],  # empty hypothesis
        ["a dog runs", "dog"],  # repeated words are clipped
        ["the cat"],  # single reference
        ["w1 w2 w3", "w3 w2 w1", "w1", "w2 w3 w1 w2", "w1 w2", "w3 w3 w3"],  # six references
        ["", "y"],  # an empty reference
    ]
    _, scores = CiderD().score(hyps, refs)
    np.testing.assert_allclose(scores, _pycoco(hyps, refs), rtol=0, atol=1e-9)
    assert scores[1] == 0.0


@pytest.mark.parametrize("sigma", [1.5, 3.0, 12.0])
def test_ciderd_equals_pycocoevalcap_for_other_sigma(sigma: float) -> None:
    # Only n = 4 has a reference: pycocoevalcap's precook always builds 1..4-grams whatever n it is given.
    hyps, refs = _random_case(random.Random(100), 25)
    _, scores = CiderD(sigma=sigma).score(hyps, refs)
    np.testing.assert_allclose(scores, _pycoco(hyps, refs, sigma=sigma), rtol=0, atol=1e-9)


def test_ciderd_single_image_scores_zero_like_pycocoevalcap() -> None:
    mean, scores = CiderD().score(["a man riding a horse"], [["a man riding a horse", "a horse"]])
    assert mean == 0.0 and scores.tolist() == [0.0]
    assert _pycoco(["a man riding a horse"], [["a man riding a horse", "a horse"]]).tolist() == [0.0]


def test_ciderd_scores_follow_their_hypotheses_when_inputs_are_permuted() -> None:
    hyps, refs = _random_case(random.Random(7), 30)
    _, scores = CiderD().score(hyps, refs)
    perm = np.random.default_rng(0).permutation(len(hyps))
    _, permuted = CiderD().score([hyps[i] for i in perm], [refs[i] for i in perm])
    np.testing.assert_allclose(permuted, scores[perm], rtol=0, atol=1e-12)


def test_ciderd_df_refs_equals_forced_pycocoevalcap_scorer() -> None:
    rng = random.Random(11)
    corpus = [[_caption(rng) for _ in range(5)] for _ in range(60)]
    scorer = CiderD(df_refs=corpus)
    # SCST layout: 4 images x 3 samples, each sample scored against its image's references; one image is new to
    # the corpus and one hypothesis uses words the corpus never saw.
    images = [*corpus[:3], ["zz unseen words here", "w1 zz w2"]]
    hyps, refs = [], []
    for image_refs in images:
        for s in range(3):
            hyps.append(image_refs[0] if s == 0 else _caption(rng))
            refs.append(image_refs)
    hyps[-1] = "zz qq w1 w2 w3"
    _, scores = scorer.score(hyps, refs)
    np.testing.assert_allclose(scores, _forced_scorer(corpus, hyps, refs), rtol=0, atol=1e-9)
    _, again = scorer.score(hyps, refs)  # repeated calls reuse the corpus statistics and give the same numbers
    np.testing.assert_array_equal(scores, again)


def test_ciderd_df_refs_matches_a_hand_computed_case() -> None:
    # Corpus of two images: df(a) = 2, df(b) = df(c) = df("a b") = df("a c") = 1, log N = log 2.
    corpus = [["a b"], ["a c"]]
    # n = 1: hyp "a b b" -> a: 0, b: 2 log2; ref "a b" -> a: 0, b: log2; cosine = log2^2 / (2 log2 * log2) = 1/2.
    # With n = 1 no bigram is counted, so the "length" of both is 0 and there is no length penalty (the quirk).
    _, scores = CiderD(df_refs=corpus, n=1).score(["a b b"], [["a b"]])
    assert scores[0] == pytest.approx(10 * 0.5, abs=1e-12)
    # n = 2: bigrams of the hyp "a b" (df 1) and "b b" (df 0): idf log2 each, cosine 1/sqrt(2);
    # lengths are the bigram counts 2 and 1, so the penalty is exp(-1 / (2 * 6^2)).
    _, scores = CiderD(df_refs=corpus, n=2).score(["a b b"], [["a b"]])
    expected = 10 * (0.5 + 1 / math.sqrt(2)) / 2 * math.exp(-1 / 72)
    assert scores[0] == pytest.approx(expected, abs=1e-12)
    # A word present in every corpus image has idf 0 and cannot earn anything.
    _, scores = CiderD(df_refs=corpus, n=1).score(["a"], [["a"]])
    assert scores[0] == 0.0


def test_ciderd_rejects_malformed_input() -> None:
    scorer = CiderD()
    with pytest.raises(ValueError, match="reference lists"):
        scorer.score(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="at least one reference"):
        scorer.score(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="no hypotheses"):
        scorer.score([], [])
    with pytest.raises(ValueError, match="n must be"):
        CiderD(n=0)
    with pytest.raises(ValueError, match="df_refs is empty"):
        CiderD(df_refs=[])


def test_cider_all_empty_hypotheses_score_zero():
    mean, per = CiderD().score(["", ""], [["a cat"], ["a dog on a mat", "dog"]])
    assert mean == 0.0 and per.tolist() == [0.0, 0.0]


def test_best_constant_caption_equals_brute_force_search():
    import random

    from eval.cider import best_constant_caption

    rng = random.Random(3)
    words = "a the red blue green cat dog on mat sofa two of with".split()
    refs = [[" ".join(rng.choices(words, k=rng.randint(2, 9))) for _ in range(rng.randint(1, 5))] for _ in range(12)]
    candidates = [" ".join(rng.choices(words, k=rng.randint(1, 10))) for _ in range(60)] + ["", "a a a a a"]
    scorer = CiderD()
    brute = max((scorer.score([c] * len(refs), refs)[0], c) for c in candidates)
    caption, score = best_constant_caption(candidates, refs, chunk=7)
    assert caption == brute[1] and score == pytest.approx(brute[0], abs=1e-12)
