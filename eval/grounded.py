"""Grounded accuracy: does a caption name what is really in the image? Captions are parsed for (colour, shape,
count) mentions and matched to a scene's structured ground truth (the synthetic dataset writes one per image).

CIDEr-D rewards n-gram overlap; these figures say whether the colours, shapes and numbers a caption names are right.
The word lists come from the caller (data.synthetic.shape_vocabulary()), so this module knows no grammar.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Mention = tuple[str | None, str, int | None]  # (colour or None, shape, count or None)


@dataclass(frozen=True)
class GroundingWords:
    """Word -> canonical lookups of a grammar: colour, shape, size and number words, and the plural shape nouns."""

    colour_words: Mapping[str, str]
    shape_words: Mapping[str, str]
    size_words: Mapping[str, str]
    counts: Mapping[str, int]
    plurals: frozenset[str]

    @classmethod
    def from_vocabulary(cls, v: Mapping[str, Any]) -> GroundingWords:
        """From data.synthetic.shape_vocabulary()'s dict."""
        return cls(v["colour_words"], v["shape_words"], v["size_words"], v["counts"], frozenset(v["shape_plurals"]))


def parse_mentions(caption: str, words: GroundingWords) -> list[Mention]:
    """(colour or None, shape, count or None) for every shape noun in a caption.

    Scanning back from a shape noun over at most three adjective words (colour or size words, in any order), the
    nearest colour word is its colour and a number word right before the adjectives is its count; without a number
    word a singular noun counts 1 and a plural noun has an unknown count (None).
    """
    tokens = re.findall(r"[a-z]+", caption.lower()) if isinstance(caption, str) else []
    mentions: list[Mention] = []
    for i, tok in enumerate(tokens):
        shape = words.shape_words.get(tok)
        if shape is None:
            continue
        colour: str | None = None
        j = i - 1
        while j >= 0 and i - j <= 3 and (tokens[j] in words.colour_words or tokens[j] in words.size_words):
            if colour is None and tokens[j] in words.colour_words:
                colour = words.colour_words[tokens[j]]
            j -= 1
        count: int | None = words.counts.get(tokens[j]) if j >= 0 else None
        if count is None and tok not in words.plurals:
            count = 1
        mentions.append((colour, shape, count))
    return mentions


@dataclass(frozen=True)
class ImageMatch:
    """How one image's mentions matched its ground-truth groups (indices into both lists)."""

    exact: dict[int, int]  # group -> mention with the same colour and shape
    shape_only: dict[int, int]  # group -> mention with the same shape (wrong or missing colour)
    colour_named: int  # groups whose colour is named by some mention, one-to-one


def match_image(groups: Sequence[Mapping[str, Any]], mentions: Sequence[Mention]) -> ImageMatch:
    """Match mentions to groups one-to-one: first on (colour, shape), then the rest on shape alone."""
    free = list(range(len(mentions)))
    exact: dict[int, int] = {}
    for gi, g in enumerate(groups):
        mi = next((m for m in free if mentions[m][0] == g["colour"] and mentions[m][1] == g["shape"]), None)
        if mi is not None:
            exact[gi] = mi
            free.remove(mi)
    shape_only: dict[int, int] = {}
    for gi, g in enumerate(groups):
        mi = None if gi in exact else next((m for m in free if mentions[m][1] == g["shape"]), None)
        if mi is not None:
            shape_only[gi] = mi
            free.remove(mi)
    colour_pool = [m[0] for m in mentions]
    named = 0
    for g in groups:
        if g["colour"] in colour_pool:
            colour_pool.remove(g["colour"])
            named += 1
    return ImageMatch(exact, shape_only, named)


def grounded_accuracy(captions: Mapping[Any, str], ground_truth: Mapping[int, Mapping[str, Any]],
                      words: GroundingWords) -> dict[str, float]:
    """Grounded accuracies of generated captions against structured ground truth (keys may be int or str ids;
    images missing from the ground truth are ignored; empty or garbage captions simply have no mentions).

    Over all ground-truth groups of the scored images unless said otherwise:
      - "colour_named": groups whose colour is named at all (mention colours matched one-to-one to groups);
      - "colour_accuracy": groups whose colour is named together with their shape (a (colour, shape) match);
      - "shape_accuracy": groups whose shape is named (either match);
      - "count_accuracy": groups with a (colour, shape) match whose mention has the right number;
      - "count_when_named": among groups whose shape is named, the share said with the right number;
      - "object_recall": objects covered by (colour, shape) matches, min(said, true) each (an unknown plural
        count covers two), over all objects;
      - "hallucination_rate": parsed mentions without a (colour, shape) match, over all mentions (0 when none);
      - "scene_accuracy": images whose groups are all matched with the right numbers and nothing else;
      - "num_images", "num_groups", "num_mentions": the denominators.
    """
    totals = dict.fromkeys(("images", "groups", "objects", "mentions", "colour", "named", "shape", "count",
                            "count_named", "hallucinated", "scenes", "covered"), 0.0)
    for key, caption in captions.items():
        entry = ground_truth.get(_as_id(key))
        if entry is None:
            continue
        groups = entry["groups"]
        mentions = parse_mentions(caption, words)
        match = match_image(groups, mentions)
        right = [gi for gi, mi in match.exact.items() if mentions[mi][2] == int(groups[gi]["count"])]
        right_named = right + [gi for gi, mi in match.shape_only.items()
                               if mentions[mi][2] == int(groups[gi]["count"])]
        totals["images"] += 1
        totals["groups"] += len(groups)
        totals["objects"] += sum(int(g["count"]) for g in groups)
        totals["mentions"] += len(mentions)
        totals["colour"] += len(match.exact)
        totals["named"] += match.colour_named
        totals["shape"] += len(match.exact) + len(match.shape_only)
        totals["count"] += len(right)
        totals["count_named"] += len(right_named)
        totals["hallucinated"] += len(mentions) - len(match.exact)
        totals["scenes"] += len(right) == len(groups) and len(mentions) == len(groups)
        totals["covered"] += sum(min(mentions[mi][2] if mentions[mi][2] is not None else 2, int(groups[gi]["count"]))
                                 for gi, mi in match.exact.items())
    return _shares(totals)


def _as_id(key: Any) -> int | None:
    try:
        return int(key)
    except (TypeError, ValueError):
        return None


def _shares(t: dict[str, float]) -> dict[str, float]:
    def share(a: float, b: float) -> float:
        return float(a) / b if b else 0.0

    return {
        "colour_accuracy": share(t["colour"], t["groups"]),
        "colour_named": share(t["named"], t["groups"]),
        "shape_accuracy": share(t["shape"], t["groups"]),
        "count_accuracy": share(t["count"], t["groups"]),
        "count_when_named": share(t["count_named"], t["shape"]),
        "object_recall": share(t["covered"], t["objects"]),
        "hallucination_rate": share(t["hallucinated"], t["mentions"]),
        "scene_accuracy": share(t["scenes"], t["images"]),
        "num_images": t["images"],
        "num_groups": t["groups"],
        "num_mentions": t["mentions"],
    }
