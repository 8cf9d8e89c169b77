"""Behaviour of eval.caption_stats: dangling endings, length and vocabulary of generated captions."""

from __future__ import annotations

import pytest

from eval.caption_stats import DANGLING_WORDS, caption_stats


def test_caption_stats_counts_dangling_endings() -> None:
    captions = ["a man riding a horse with a", "a dog on the", "a cat sleeping on a couch", "two birds and"]
    stats = caption_stats(captions)
    assert stats["dangling_share"] == pytest.approx(3 / 4)
    assert stats["num_captions"] == 4


@pytest.mark.parametrize("word", DANGLING_WORDS)
def test_caption_stats_treats_every_dangling_word_as_dangling(word: str) -> None:
    assert caption_stats([f"a man riding a horse {word}"])["dangling_share"] == 1.0


def test_caption_stats_ignores_case_and_trailing_punctuation() -> None:
    stats = caption_stats(["A man with A .", "A dog on The.", "a cat ."])
    assert stats["dangling_share"] == pytest.approx(2 / 3)
    assert stats["mean_length"] == pytest.approx((4 + 4 + 2) / 3)


def test_caption_stats_measures_length_and_vocabulary() -> None:
    stats = caption_stats(["a man riding a horse", "a horse", ""])
    assert stats["mean_length"] == pytest.approx((5 + 2 + 0) / 3)
    assert stats["vocab_used"] == 4  # a, man, riding, horse
    assert stats["dangling_share"] == 0.0  # the empty caption is not dangling


def test_caption_stats_of_no_captions_is_all_zero() -> None:
    assert caption_stats([]) == {"dangling_share": 0.0, "mean_length": 0.0, "vocab_used": 0, "num_captions": 0}


def test_caption_stats_does_not_flag_words_merely_containing_a_dangling_word() -> None:
    assert caption_stats(["a view of the ocean", "a pan", "they went within"])["dangling_share"] == 0.0
