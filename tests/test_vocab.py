"""Tests for the reference tokeniser and the vocabulary (build order, JSON files, restricted pickle reading)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from data.vocab import (
    EOS,
    PAD,
    SOS,
    UNK,
    Vocabulary,
    VocabularyError,
    build_vocabulary,
    max_caption_length,
    tokenize,
)


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A man riding a horse.", ["a", "man", "riding", "a", "horse"]),
        ("Don't stop!", ["don", "t", "stop"]),
        ('A sign that says "STOP"', ["a", "sign", "that", "says", '"', "stop", '"']),
        ("A cat\non a mat", ["a", "cat", "\n", "on", "a", "mat"]),
        ("A dog.  \n", ["a", "dog"]),
        ("Two-tone car, 3 wheels; #1 ...", ["two", "tone", "car", "3", "wheels", "#", "1"]),
        ("a\tb", ["a", "\t", "b"]),
        ("Café snake_case", ["café", "snake_case"]),
        ("What?! `quoted' -- ok: yes", ["what", "quoted", "ok", "yes"]),
        ("", []),
    ],
)
def test_tokenize_matches_reference_rules(caption: str, expected: list[str]) -> None:
    assert tokenize(caption) == expected


def test_tokenize_rstrips_only_so_a_leading_newline_is_a_token() -> None:
    # rstrip only: a trailing newline vanishes, a leading one is a token, as in the reference.
    assert tokenize("\na dog\n") == ["\n", "a", "dog"]


CORPUS = [
    "A dog runs.",
    "A dog sits!",
    "The cat\nsleeps on a\nmat",
    'A "big" dog',
    'A "small" dog with 2 ears',
    "2 zebras",
    "pad unk",
]


def test_build_vocabulary_order_and_special_indices() -> None:
    vocab = build_vocabulary(CORPUS, min_count=2)
    # Python string order: control chars, symbols, digits, the upper-case specials, then words.
    assert vocab.tokens == ("\n", '"', "2", "EOS", "PAD", "SOS", "UNK", "a", "dog")
    assert (vocab.eos_idx, vocab.pad_idx, vocab.sos_idx, vocab.unk_idx) == (3, 4, 5, 6)
    assert vocab.tokens[0] == "\n"
    assert vocab.word2idx["dog"] == 8


def test_build_vocabulary_min_count_thresholds() -> None:
    assert build_vocabulary(CORPUS, min_count=100).tokens == (EOS, PAD, SOS, UNK)
    everything = build_vocabulary(CORPUS, min_count=1)
    assert "zebras" in everything and "pad" in everything and "PAD" in everything
    assert len(everything) == len({w for c in CORPUS for w in tokenize(c)}) + 4
    # occurrences are counted, not captions: "dog dog" alone reaches 2
    assert "dog" in build_vocabulary(["dog dog"], min_count=2)
    assert "dog" not in build_vocabulary(["dog dog"], min_count=3)
    with pytest.raises(ValueError, match="min_count"):
        build_vocabulary(CORPUS, min_count=0)


def test_vocabulary_encode_and_decode() -> None:
    vocab = build_vocabulary(CORPUS, min_count=2)
    ids = vocab.encode("A dog flies.")
    assert ids == [vocab.sos_idx, vocab.word2idx["a"], vocab.word2idx["dog"], vocab.unk_idx, vocab.eos_idx]
    assert vocab.encode_tokens(["dog", "zzz"]) == [vocab.sos_idx, 8, vocab.unk_idx, vocab.eos_idx]
    a, dog = vocab.word2idx["a"], vocab.word2idx["dog"]
    assert vocab.decode([vocab.sos_idx, a, vocab.pad_idx, dog, vocab.eos_idx, a]) == "a dog"
    assert vocab.decode(torch.tensor([a, dog, vocab.eos_idx])) == "a dog"
    assert vocab.decode([vocab.unk_idx]) == "UNK"
    with pytest.raises(VocabularyError, match="outside the vocabulary"):
        vocab.decode([len(vocab)])


def test_vocabulary_rejects_missing_specials_and_duplicates() -> None:
    with pytest.raises(VocabularyError, match="UNK"):
        Vocabulary([PAD, SOS, EOS, "a"])
    with pytest.raises(VocabularyError, match="duplicate"):
        Vocabulary([PAD, SOS, EOS, UNK, "a", "a"])


def test_vocabulary_equality_and_hash() -> None:
    one = Vocabulary([EOS, PAD, SOS, UNK, "a"])
    assert one == Vocabulary((EOS, PAD, SOS, UNK, "a"))
    assert one != Vocabulary([EOS, PAD, SOS, UNK, "b"])
    assert len({one, Vocabulary([EOS, PAD, SOS, UNK, "a"])}) == 1
    mapping = one.word2idx
    mapping["a"] = 99
    assert one.word2idx["a"] == 4


def test_vocabulary_json_round_trip(tmp_path: Path) -> None:
    vocab = build_vocabulary(CORPUS, min_count=2)
    data = vocab.to_dict()
    assert data == {"format": "vocabulary", "version": 1, "tokens": list(vocab.tokens)}
    assert Vocabulary.from_dict(json.loads(json.dumps(data))) == vocab
    path = vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(path) == vocab
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # no temp file left behind


def test_vocabulary_save_refuses_to_overwrite_a_different_file(tmp_path: Path) -> None:
    path = tmp_path / "vocab.json"
    first = Vocabulary([EOS, PAD, SOS, UNK, "a"])
    second = Vocabulary([EOS, PAD, SOS, UNK, "b"])
    first.save(path)
    first.save(path)  # same content: fine
    with pytest.raises(FileExistsError, match="vocab.json"):
        second.save(path)
    assert Vocabulary.load(path) == first
    second.save(path, overwrite=True)
    assert Vocabulary.load(path) == second


def test_vocabulary_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Vocabulary.load(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(VocabularyError, match=r"broken\.json.*not valid JSON"):
        Vocabulary.load(broken)
    nospecial = tmp_path / "nospecial.json"
    nospecial.write_text(json.dumps({"tokens": ["EOS", "PAD", "SOS", "a"]}), encoding="utf-8")
    with pytest.raises(VocabularyError, match=r"nospecial\.json.*UNK"):
        Vocabulary.load(nospecial)
    notokens = tmp_path / "notokens.json"
    notokens.write_text(json.dumps({"words": []}), encoding="utf-8")
    with pytest.raises(VocabularyError, match=r"notokens\.json.*'tokens'"):
        Vocabulary.load(notokens)


def _official_dict(tokens: list[str]) -> dict[str, object]:
    return {
        "word2idx_dict": {word: index for index, word in enumerate(tokens)},
        "idx2word_list": list(tokens),
        "sos_str": "SOS",
        "eos_str": "EOS",
    }


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_vocabulary_from_official_pickle_reads_builtins(tmp_path: Path, protocol: int) -> None:
    tokens = ["\n", '"', "EOS", "PAD", "SOS", "UNK", "a", "zucchini"]
    path = tmp_path / "demo_coco_tokens.pickle"
    path.write_bytes(pickle.dumps(_official_dict(tokens), protocol=protocol))
    vocab = Vocabulary.from_official_pickle(path)
    assert vocab.tokens == tuple(tokens)
    assert (vocab.eos_idx, vocab.pad_idx, vocab.sos_idx, vocab.unk_idx) == (2, 3, 4, 5)
    assert Vocabulary.load(path) == vocab  # .pickle suffix goes through the restricted reader


class _Exploit:
    """Pickles as a call to os.system: a plain pickle.load would run the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


def test_vocabulary_from_official_pickle_refuses_globals_without_executing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = _official_dict(["EOS", "PAD", "SOS", "UNK"])
    payload["idx2word_list"] = _Exploit(f"touch {marker}")
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps(payload))
    assert b"system" in path.read_bytes()
    with pytest.raises(VocabularyError, match=r"evil\.pickle.*refused.*system"):
        Vocabulary.from_official_pickle(path)
    assert not marker.exists()


def test_vocabulary_from_official_pickle_bad_content_names_file(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pickle"
    truncated.write_bytes(pickle.dumps(_official_dict(["EOS", "PAD", "SOS", "UNK"]))[:20])
    with pytest.raises(VocabularyError, match=r"truncated\.pickle"):
        Vocabulary.from_official_pickle(truncated)
    wrong = tmp_path / "wrong.pickle"
    bad = _official_dict(["EOS", "PAD", "SOS", "UNK"])
    del bad["sos_str"]
    wrong.write_bytes(pickle.dumps(bad))
    with pytest.raises(VocabularyError, match=r"wrong\.pickle.*sos_str"):
        Vocabulary.from_official_pickle(wrong)
    with pytest.raises(FileNotFoundError, match="absent.pickle"):
        Vocabulary.from_official_pickle(tmp_path / "absent.pickle")


def test_max_caption_length_counts_sos_and_eos() -> None:
    captions = ["A dog.", "A big brown dog runs!", "cat"]
    assert max_caption_length(captions) == 7
    assert max_caption_length(captions, build_vocabulary(captions, min_count=1)) == 7
    assert max_caption_length([]) == 0
