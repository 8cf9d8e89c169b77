"""Caption tokenisation and the word vocabulary, reproducing ExpansionNet v2's rules exactly."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from utils.files import atomic_write_text

PAD = "PAD"
SOS = "SOS"
EOS = "EOS"
UNK = "UNK"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, SOS, EOS, UNK)

# Tokens the reference drops after splitting (utils/language_utils.remove_punctuations), plus the empty string.
DROPPED_TOKENS: frozenset[str] = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", ""})
_NON_WORD = re.compile(r"([^\w0-9])")

VOCAB_FORMAT = "vocabulary"
VOCAB_VERSION = 1
_MAX_PICKLE_BYTES = 64 * 1024 * 1024


class VocabularyError(ValueError):
    """A vocabulary file or token list is malformed; the message names the file when there is one."""


def tokenize(caption: str) -> list[str]:
    """Split a caption into words exactly as the reference does (no SOS/EOS).

    Lowercase and rstrip, put spaces around every non-word character, split on single spaces and drop the
    punctuation tokens and empty strings. Other symbols ('"', '#', an embedded '\\n', ...) are kept as tokens,
    as in the reference: the official vocabulary depends on it.
    """
    spaced = _NON_WORD.sub(r" \1 ", caption.lower().rstrip())
    return [word for word in spaced.split(" ") if word not in DROPPED_TOKENS]


class Vocabulary:
    """An immutable token list whose positions are the token ids; always holds PAD, SOS, EOS and UNK."""

    __slots__ = ("_tokens", "_word2idx")

    def __init__(self, tokens: Iterable[str]) -> None:
        token_tuple = tuple(tokens)
        word2idx: dict[str, int] = {}
        for index, token in enumerate(token_tuple):
            if not isinstance(token, str):
                raise VocabularyError(f"token at index {index} is {type(token).__name__}, expected str")
            if token in word2idx:
                raise VocabularyError(f"duplicate token {token!r} at indices {word2idx[token]} and {index}")
            word2idx[token] = index
        missing = [special for special in SPECIAL_TOKENS if special not in word2idx]
        if missing:
            raise VocabularyError(f"vocabulary lacks the special token(s) {', '.join(missing)}")
        self._tokens = token_tuple
        self._word2idx = word2idx

    @property
    def tokens(self) -> tuple[str, ...]:
        """The tokens in id order."""
        return self._tokens

    @property
    def word2idx(self) -> dict[str, int]:
        """A fresh token -> id mapping (a copy, so callers cannot corrupt the vocabulary)."""
        return dict(self._word2idx)

    pad_idx = property(lambda self: self._word2idx[PAD], doc="id of the padding token")
    sos_idx = property(lambda self: self._word2idx[SOS], doc="id of the start-of-sentence token")
    eos_idx = property(lambda self: self._word2idx[EOS], doc="id of the end-of-sentence token")
    unk_idx = property(lambda self: self._word2idx[UNK], doc="id of the unknown-word token")

    def __len__(self) -> int:
        return len(self._tokens)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self._tokens == other._tokens

    def __hash__(self) -> int:
        return hash(self._tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._word2idx

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)}, pad={self.pad_idx}, sos={self.sos_idx}, eos={self.eos_idx})"

    def index(self, token: str) -> int:
        """The id of ``token``, or UNK's id when the token is unknown."""
        return self._word2idx.get(token, self._word2idx[UNK])

    def encode_tokens(self, words: Iterable[str]) -> list[int]:
        """SOS + ids of ``words`` (UNK for unknown ones) + EOS."""
        unk = self.unk_idx
        return [self.sos_idx, *(self._word2idx.get(word, unk) for word in words), self.eos_idx]

    def encode(self, caption: str) -> list[int]:
        """Tokenise a raw caption and encode it as SOS + ids + EOS."""
        return self.encode_tokens(tokenize(caption))

    def decode(self, ids: Sequence[int]) -> str:
        """Turn ids back into words: skip a leading SOS, stop at EOS, skip PAD, join with spaces.

        Accepts any sequence of integers, including 1-D tensors and arrays.
        """
        pad, sos, eos, size = self.pad_idx, self.sos_idx, self.eos_idx, len(self._tokens)
        words: list[str] = []
        for position, raw in enumerate(ids):
            idx = int(raw)
            if position == 0 and idx == sos:
                continue
            if idx == eos:
                break
            if idx == pad:
                continue
            if not 0 <= idx < size:
                raise VocabularyError(f"token id {idx} at position {position} is outside the vocabulary (size {size})")
            words.append(self._tokens[idx])
        return " ".join(words)

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-able description of the vocabulary."""
        return {"format": VOCAB_FORMAT, "version": VOCAB_VERSION, "tokens": list(self._tokens)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> Vocabulary:
        """Rebuild a vocabulary from :meth:`to_dict` output; ``source`` names the origin in error messages."""
        where = f"{source}: " if source else ""
        if not isinstance(data, Mapping):
            raise VocabularyError(f"{where}expected a JSON object with a 'tokens' list, got {type(data).__name__}")
        if data.get("format", VOCAB_FORMAT) != VOCAB_FORMAT:
            raise VocabularyError(f"{where}'format' is {data.get('format')!r}, expected {VOCAB_FORMAT!r}")
        version = data.get("version", VOCAB_VERSION)
        if version != VOCAB_VERSION:
            raise VocabularyError(f"{where}unsupported 'version' {version!r} (this code reads {VOCAB_VERSION})")
        tokens = data.get("tokens")
        if not isinstance(tokens, list):
            raise VocabularyError(f"{where}field 'tokens' is missing or not a list")
        try:
            return cls(tokens)
        except VocabularyError as exc:
            raise VocabularyError(f"{where}{exc}") from None

    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the vocabulary as JSON atomically (temp file + os.replace).

        An existing file holding the same vocabulary is left as is; a different one is only replaced when
        ``overwrite`` is true, so a run never silently swaps the vocabulary another checkpoint was trained with.
        """
        target = Path(path)
        if target.exists() and not overwrite:
            try:
                existing = Vocabulary.load(target)
            except (VocabularyError, OSError):
                existing = None
            if existing == self:
                return target
            raise FileExistsError(f"{target}: a different vocabulary file already exists (pass overwrite=True)")
        target.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(self.to_dict(), ensure_ascii=False, indent=0) + "\n"
        atomic_write_text(target, payload)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocabulary:
        """Read a vocabulary saved by :meth:`save`; ``.pickle``/``.pkl`` files go to :meth:`from_official_pickle`."""
        source = Path(path)
        if source.suffix.lower() in (".pickle", ".pkl"):
            return cls.from_official_pickle(source)
        if not source.is_file():
            raise FileNotFoundError(f"{source}: vocabulary file not found")
        try:
            text = source.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise VocabularyError(f"{source}: not UTF-8 (byte offset {exc.start}); not a vocabulary JSON") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VocabularyError(
                f"{source}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); not a vocabulary file"
            ) from None
        return cls.from_dict(data, source=str(source))

    @classmethod
    def from_official_pickle(cls, path: str | os.PathLike[str]) -> Vocabulary:
        """Read the official ExpansionNet v2 ``demo_coco_tokens.pickle`` with a restricted unpickler.

        The file must contain only builtin containers and strings/ints; any class or function reference is refused
        before it can be imported or called, so a malicious pickle cannot execute code.
        """
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"{source}: vocabulary pickle not found")
        size = source.stat().st_size
        if size > _MAX_PICKLE_BYTES:
            raise VocabularyError(f"{source}: {size} bytes is too large for a vocabulary pickle")
        raw = source.read_bytes()
        try:
            data = _RestrictedUnpickler(io.BytesIO(raw)).load()
        except _ForbiddenPickleError as exc:
            raise VocabularyError(f"{source}: refused to unpickle: {exc}") from None
        except Exception as exc:  # any unpickling failure means a bad file
            raise VocabularyError(f"{source}: not a readable vocabulary pickle ({type(exc).__name__}: {exc})") from None
        return cls._from_official_dict(data, str(source))

    @classmethod
    def _from_official_dict(cls, data: Any, source: str) -> Vocabulary:
        """Validate the official pickle's dict and build the vocabulary from its ``idx2word_list``."""
        if not isinstance(data, dict):
            raise VocabularyError(f"{source}: expected a dict, got {type(data).__name__}")
        required = ("word2idx_dict", "idx2word_list", "sos_str", "eos_str")
        missing = [key for key in required if key not in data]
        if missing:
            raise VocabularyError(f"{source}: missing key(s) {', '.join(missing)}")
        idx2word, word2idx = data["idx2word_list"], data["word2idx_dict"]
        if not isinstance(idx2word, list) or not all(isinstance(word, str) for word in idx2word):
            raise VocabularyError(f"{source}: 'idx2word_list' must be a list of str")
        if not isinstance(word2idx, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in word2idx.items()
        ):
            raise VocabularyError(f"{source}: 'word2idx_dict' must map str to int")
        if word2idx != {word: index for index, word in enumerate(idx2word)}:
            raise VocabularyError(f"{source}: 'word2idx_dict' disagrees with 'idx2word_list'")
        if data["sos_str"] != SOS or data["eos_str"] != EOS:
            raise VocabularyError(
                f"{source}: 'sos_str'/'eos_str' are {data['sos_str']!r}/{data['eos_str']!r}, expected {SOS!r}/{EOS!r}"
            )
        try:
            return cls(idx2word)
        except VocabularyError as exc:
            raise VocabularyError(f"{source}: {exc}") from None


class _ForbiddenPickleError(pickle.UnpicklingError):
    """A pickle referenced a global (class or function); refused."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global: only builtin containers and scalars can be rebuilt."""

    def find_class(self, module: str, name: str) -> Any:
        raise _ForbiddenPickleError(f"the pickle references {module}.{name}; only dict/list/str/int are allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise _ForbiddenPickleError("the pickle uses persistent ids; only dict/list/str/int are allowed")


def build_vocabulary(captions: Iterable[str], min_count: int = 5) -> Vocabulary:
    """Build the vocabulary as the reference does: words seen ``>= min_count`` times plus the 4 specials, sorted.

    Sorting is plain Python string order, so with the Karpathy COCO train+restval captions and ``min_count=5`` this
    gives the official 10,000 tokens ('\\n' at 0, EOS=77, PAD=78, SOS=79, UNK=80).
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(tokenize(caption))
    kept = {word for word, count in counts.items() if count >= min_count}
    kept.update(SPECIAL_TOKENS)
    return Vocabulary(sorted(kept))


def max_caption_length(captions: Iterable[str], vocab: Vocabulary | None = None) -> int:
    """Length of the longest tokenised caption including SOS and EOS (the reference's ``max_seq_len``).

    The vocabulary does not change the length (unknown words map one-to-one to UNK); it is accepted so callers can
    pass the one they train with, and when given the length is measured on the encoded ids.
    """
    longest = 0
    for caption in captions:
        length = len(vocab.encode(caption)) if vocab is not None else len(tokenize(caption)) + 2
        longest = max(longest, length)
    return longest
