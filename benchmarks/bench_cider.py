"""Benchmark eval.cider.CiderD against pycocoevalcap's Cider (evaluation mode) and in SCST reward mode (df_refs)."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any


def _single_thread() -> None:
    """Pin BLAS/OpenMP pools to one thread; must run before numpy is imported."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = "1"


def _median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls of ``fn`` and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def make_dataset(
    num_images: int, refs_per_image: int, vocab_size: int, seed: int
) -> tuple[list[str], list[list[str]], list[str]]:
    """Synthetic captions of 8-15 words from a Zipf-like vocabulary: (hyps (I,), refs (I, R), vocabulary)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(vocab_size)]
    prob = 1.0 / np.arange(1, vocab_size + 1) ** 1.1
    prob /= prob.sum()

    def caption() -> list[str]:
        return [vocab[i] for i in rng.choice(vocab_size, size=int(rng.integers(8, 16)), p=prob)]

    refs = [[" ".join(caption()) for _ in range(refs_per_image)] for _ in range(num_images)]
    hyps = []
    for image_refs in refs:
        words = image_refs[int(rng.integers(len(image_refs)))].split()
        for j in range(len(words)):  # perturb a copy of one reference, so that n-grams overlap realistically
            if rng.random() < 0.3:
                words[j] = vocab[int(rng.choice(vocab_size, p=prob))]
        hyps.append(" ".join(words[: int(rng.integers(6, len(words) + 1))]))
    return hyps, refs, vocab


def _forced_df_scorer(
    df: dict[tuple[str, ...], float], log_n: float, hyps: Sequence[str], refs: Sequence[Sequence[str]]
) -> list[float]:
    """pycocoevalcap's CiderScorer with document frequencies and log(N) forced to a corpus (pure-Python reward)."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    class _Forced(CiderScorer):
        ref_len = property(lambda self: log_n, lambda self, value: None)

    scorer = _Forced(n=4, sigma=6.0)
    for hyp, image_refs in zip(hyps, refs):
        scorer += (hyp, list(image_refs))
    scorer.document_frequency = defaultdict(float, df)
    return scorer.compute_cider()


def main(argv: Sequence[str] | None = None) -> int:
    """Time both implementations, check the scores agree, print the figures."""
    _single_thread()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reward-calls", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import common  # noqa: F401  (puts the repository root on sys.path)
    import numpy as np
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.cider.cider_scorer import precook

    from eval.cider import CiderD

    hyps, refs, _ = make_dataset(args.images, args.refs, args.vocab, args.seed)
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    print(f"evaluation mode: {args.images} images x {args.refs} refs, vocabulary {args.vocab}, single thread")
    t_ref, (mean_ref, scores_ref) = _median_seconds(lambda: Cider().compute_score(gts, res), max(1, args.repeats // 2))
    t_ours, (mean_ours, scores_ours) = _median_seconds(lambda: CiderD().score(hyps, refs), args.repeats)
    max_diff = float(np.max(np.abs(np.asarray(scores_ref) - scores_ours)))
    assert max_diff < 1e-9, f"scores differ by {max_diff}"
    print(f"  pycocoevalcap Cider : {t_ref:.3f} s  (CIDEr-D {mean_ref:.6f})")
    print(f"  eval.cider.CiderD   : {t_ours:.3f} s  (CIDEr-D {mean_ours:.6f}, max |diff| {max_diff:.1e})")
    print(f"  speed-up            : {t_ref / t_ours:.1f}x")

    # Reward mode: df from a fixed corpus; each call scores 24 images x 5 samples against the images' 5 refs.
    batch, samples = 24, 5
    rng = np.random.default_rng(args.seed + 1)
    start = time.perf_counter()
    reward = CiderD(df_refs=refs)
    t_build = time.perf_counter() - start
    calls = []
    for _ in range(args.reward_calls):
        images = rng.choice(len(refs), size=batch, replace=False)
        call_hyps = [hyps[int(rng.choice(len(hyps)))] if s else hyps[i] for i in images for s in range(samples)]
        calls.append((call_hyps, [refs[i] for i in images for _ in range(samples)]))
    start = time.perf_counter()
    for call_hyps, call_refs in calls:
        reward.score(call_hyps, call_refs)
    t_calls = time.perf_counter() - start
    print(f"reward mode: df from {len(refs)} images (built in {t_build:.2f} s), {batch} images x {samples} samples")
    per_call_ms = 1e3 * t_calls / args.reward_calls
    print(f"  eval.cider.CiderD   : {args.reward_calls / t_calls:.0f} calls/s ({per_call_ms:.2f} ms per call)")

    df: dict[tuple[str, ...], float] = defaultdict(float)
    for image_refs in refs:
        for ngram in {g for r in image_refs for g in precook(r, 4)}:
            df[ngram] += 1.0
    log_n = float(np.log(float(len(refs))))
    few = calls[: max(1, args.reward_calls // 10)]
    start = time.perf_counter()
    for call_hyps, call_refs in few:
        expected = _forced_df_scorer(df, log_n, call_hyps, call_refs)
    t_py = time.perf_counter() - start
    got = reward.score(*few[-1])[1]
    max_diff = float(np.max(np.abs(np.asarray(expected) - got)))
    assert max_diff < 1e-9, f"reward scores differ by {max_diff}"
    print(f"  pure-Python scorer  : {len(few) / t_py:.0f} calls/s (max |diff| {max_diff:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
