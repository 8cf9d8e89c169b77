"""Caption statistics that expose SCST reward hacking: dangling endings ("... with a"), length and vocabulary."""

from __future__ import annotations

from collections.abc import Sequence

DANGLING_WORDS: tuple[str, ...] = ("a", "an", "the", "with", "of", "on", "and", "in")
_TRAILING_PUNCT = ".,;:!?\"'`"


def _words(caption: str) -> list[str]:
    """Lower-cased words of a caption, without punctuation-only tokens and trailing punctuation."""
    words = (w.strip(_TRAILING_PUNCT) for w in caption.lower().split())
    return [w for w in words if w]


def caption_stats(captions: Sequence[str]) -> dict[str, float | int]:
    """Share of captions ending in a dangling word, mean length in words, distinct words, number of captions.

    A caption such as "a man riding a horse with a" ends in a fragment: the symptom of an SCST reward that ignores
    the end-of-sentence token. Empty captions count in num_captions with length 0 and are not dangling.
    """
    dangling = set(DANGLING_WORDS)
    num_dangling, total_words, vocab = 0, 0, set()
    for caption in captions:
        words = _words(caption)
        total_words += len(words)
        vocab.update(words)
        num_dangling += bool(words) and words[-1] in dangling
    count = len(captions)
    return {
        "dangling_share": num_dangling / count if count else 0.0,
        "mean_length": total_words / count if count else 0.0,
        "vocab_used": len(vocab),
        "num_captions": count,
    }
