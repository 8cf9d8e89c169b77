"""Behaviour of eval.metrics: sanitising, tokenisation, metric isolation, Java timeouts and offline SPICE."""

from __future__ import annotations

import os
import shutil
import socket
import urllib.request
from pathlib import Path

import pytest

from eval import metrics
from eval.cider import CiderD
from eval.metrics import (
    JavaStepError,
    find_java,
    meteor_score,
    ptb_tokenize,
    python_tokenize,
    sanitize_caption,
    score_captions,
    shared_meteor,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs java on PATH")
needs_posix = pytest.mark.skipif(os.name != "posix", reason="fake java scripts need a POSIX shell")

GTS = {
    1: ["A man riding a horse.", "A person on a brown horse in a field."],
    2: ["Two dogs play with a ball!", "Dogs playing on the grass."],
    3: ["A cat, sleeping on a sofa.", "A cat lying on a couch."],
    4: ["A plate of food with a fork.", "Pizza on a white plate."],
}
RES = {1: "a man rides a horse", 2: "two dogs playing with a ball", 3: "a cat sleeping on a couch", 4: "a pizza"}
ORDINARY = [
    "A man, riding a horse.",
    "Two dogs' toys on the floor.",
    "A cat can't sit still!",
    "Is this a bird? Yes.",
    "A woman's purse: red & blue.",
    "A black-and-white photo of a man's face",
    "Pizza costs $5, 50% off #1",
    "people walking down a street in the U.S.",
    "They're going to the park; it's sunny.",
    'A sign that says "STOP".',
    "a dog (brown) next to a 10:30 clock",
    "A group of people standing around a kitchen counter .",
]
HOSTILE_GTS = {
    "a": ["A man\nriding a horse|||fast", "A person\r\non a horse\x00\x1b[31m"],
    "b": ["Two dogs \u2028play", "dogs ||| playing", "\u200b"],
    "c": ["Café naïve 日本 🐱", "a cat"],
    "d": ["a", "b"],
}
HOSTILE_RES = {"a": "a man ||| rides\na horse\t\x07", "b": "", "c": "日本 🐱 café", "d": "|||"}


@pytest.fixture
def no_java(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """PATH without java and a fresh find_java cache (cleared again afterwards)."""
    monkeypatch.setenv("PATH", str(tmp_path))
    find_java.cache_clear()
    yield
    find_java.cache_clear()


def _fake_java(folder: Path, body: str) -> Path:
    """An executable ``java`` script that answers ``-version`` like Java 17 and otherwise runs ``body``."""
    path = folder / "java"
    version = 'if [ "$1" = "-version" ]; then echo \'openjdk version "17.0.1"\' >&2; exit 0; fi'
    path.write_text(f"#!/bin/sh\n{version}\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection or download fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(urllib.request, "urlretrieve", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def _java_children() -> list[int]:
    """Pids of java processes whose parent is this test process (Linux /proc; empty elsewhere)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split()
        except OSError:
            continue
        if fields[1] == "(java)" and int(fields[3]) == os.getpid() and fields[2] != "Z":
            found.append(int(fields[0]))
    return found


def test_sanitize_caption_removes_line_breaks_separators_and_controls() -> None:
    text = "A man\nriding|||a\r\nhorse\x00\x07\x0b\x0c\x85\u2028\u2029 \u200bCafé\t 日本 "
    assert sanitize_caption(text) == "A man riding a horse Café 日本"
    assert sanitize_caption("||||") == "|"
    assert sanitize_caption("   ") == ""
    with pytest.raises(TypeError):
        sanitize_caption(None)  # type: ignore[arg-type]


def test_python_tokenize_follows_ptb_and_pycocoevalcap_rules() -> None:
    assert python_tokenize("A man, riding a horse.") == "a man riding a horse"
    assert python_tokenize("A cat can't sit; it's a dog's life!") == "a cat ca n't sit it 's a dog 's life"
    assert python_tokenize('A sign that says "STOP" (red).') == "a sign that says stop -lrb- red -rrb-"
    assert python_tokenize("people in the U.S. -- 1,000 of them: $5") == "people in the u.s. 1,000 of them $ 5"
    assert python_tokenize("a\nb|||c") == "a b c"


@needs_java
def test_python_tokenize_agrees_with_java_ptb_on_ordinary_captions() -> None:
    java = find_java()
    assert java is not None
    expected = ptb_tokenize(java, [sanitize_caption(c) for c in ORDINARY], timeout_s=120)
    assert [python_tokenize(c) for c in ORDINARY] == expected


@needs_java
def test_score_captions_equals_pycocoevalcap_scorers() -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    report = score_captions(GTS, RES, metrics=("BLEU", "ROUGE_L", "CIDEr"))
    assert report.tokenizer == "ptb" and report.official and report.unavailable == {}
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in GTS.items()})
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in RES.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for i in range(4):
        assert report.scores[f"BLEU-{i + 1}"] == pytest.approx(bleu[i], abs=1e-12)
    assert report.scores["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert report.scores["CIDEr-D"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)


def test_score_captions_without_java_still_scores_bleu_rouge_cider(no_java: None) -> None:
    assert find_java() is None
    report = score_captions(GTS, RES)
    assert report.tokenizer == "python" and report.official is False
    assert set(report.scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"}
    assert "java" in report.unavailable["METEOR"].lower()
    assert "java" in report.notes["tokenizer"].lower()
    ids = list(GTS)
    expected, _ = CiderD().score(
        [python_tokenize(RES[i]) for i in ids], [[python_tokenize(c) for c in GTS[i]] for i in ids]
    )
    assert report.scores["CIDEr-D"] == pytest.approx(expected, abs=1e-12)


def test_score_captions_isolates_a_raising_scorer(monkeypatch: pytest.MonkeyPatch, no_java: None) -> None:
    from pycocoevalcap.rouge.rouge import Rouge

    def boom(self, gts, res):
        raise RuntimeError("boom")

    monkeypatch.setattr(Rouge, "compute_score", boom)
    report = score_captions(GTS, RES, metrics=("BLEU", "ROUGE_L", "CIDEr"))
    assert report.unavailable == {"ROUGE-L": "RuntimeError: boom"}
    assert {"BLEU-4", "CIDEr-D"} <= set(report.scores) and "ROUGE-L" not in report.scores


def test_score_captions_accepts_aliases_and_coco_style_results(no_java: None) -> None:
    report = score_captions(GTS, {k: [v] for k, v in RES.items()}, metrics=("bleu-4", "ROUGE-L", "CIDEr-D"))
    assert set(report.scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"}


def test_score_captions_rejects_mismatched_ids_and_unknown_metrics(no_java: None) -> None:
    with pytest.raises(ValueError, match="ids differ"):
        score_captions(GTS, {1: "a man"})
    with pytest.raises(ValueError, match="unknown metric"):
        score_captions(GTS, RES, metrics=("WER",))
    with pytest.raises(ValueError, match="non-empty list"):
        score_captions({1: []}, {1: "a"})


def test_find_java_looks_java_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_which = shutil.which

    def counting_which(name, *args, **kwargs):
        calls.append(name)
        return real_which(name, *args, **kwargs)

    monkeypatch.setattr(metrics.shutil, "which", counting_which)
    find_java.cache_clear()
    try:
        first, second = find_java(), find_java()
    finally:
        find_java.cache_clear()
    assert first == second and calls == ["java"]


def test_score_captions_spice_without_jars_is_unavailable_without_network(no_network: None, tmp_path: Path) -> None:
    for spice_dir in (None, tmp_path):
        report = score_captions(GTS, RES, metrics=("CIDEr", "SPICE"), spice_dir=spice_dir)
        reason = report.unavailable["SPICE"]
        assert "stanford-corenlp-3.6.0.jar" in reason and "never downloads" in reason
        assert "CIDEr-D" in report.scores


@needs_java
def test_score_captions_spice_with_broken_jars_reports_the_java_error(no_network: None, tmp_path: Path) -> None:
    for name in metrics.SPICE_JARS:  # empty files: the JVM starts SPICE, which then misses the CoreNLP classes
        (tmp_path / name).write_bytes(b"")
    report = score_captions(GTS, RES, metrics=("BLEU", "SPICE"), spice_dir=tmp_path, java_timeout_s=120)
    assert report.unavailable["SPICE"].startswith("SPICE exited with")
    assert "BLEU-4" in report.scores
    assert _java_children() == []


@needs_java
def test_meteor_score_timeout_kills_the_jvm() -> None:
    java = find_java()
    assert java is not None
    with pytest.raises(JavaStepError, match="timed out"):
        meteor_score(java, [["a man riding a horse"]], ["a man on a horse"], timeout_s=0.3)
    assert _java_children() == []


@needs_posix
def test_java_steps_kill_a_hanging_java_and_its_children(tmp_path: Path) -> None:
    # A wrapper script whose child keeps the pipes open: killing only the wrapper would still hang.
    java = str(_fake_java(tmp_path, f"sleep 60 & echo $! >> {tmp_path / 'children'}; wait"))
    with pytest.raises(JavaStepError, match="timed out"):
        meteor_score(java, [["a b"]], ["a"], timeout_s=0.5)
    with pytest.raises(JavaStepError, match="timed out"):
        ptb_tokenize(java, ["a b"], timeout_s=0.5)
    children = [int(pid) for pid in (tmp_path / "children").read_text().split()]
    assert len(children) == 2
    for pid in children:  # gone, or a zombie waiting to be reaped by init: never still sleeping
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z"


@needs_posix
def test_score_captions_falls_back_when_the_ptb_tokenizer_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_java(tmp_path, "echo 'Error: broken java' >&2; exit 1")
    monkeypatch.setenv("PATH", str(tmp_path))
    find_java.cache_clear()
    try:
        assert find_java() == str(tmp_path / "java")
        report = score_captions(GTS, RES)
    finally:
        find_java.cache_clear()
    assert report.tokenizer == "python" and not report.official
    assert "broken java" in report.notes["tokenizer"]
    assert "PTB tokenizer failed" in report.unavailable["METEOR"]
    assert {"BLEU-4", "ROUGE-L", "CIDEr-D"} <= set(report.scores)


@needs_posix
def test_meteor_score_reports_a_crashing_jvm(tmp_path: Path) -> None:
    java = str(_fake_java(tmp_path, "echo 'Error: boom' >&2; exit 3"))
    with pytest.raises(JavaStepError, match="Error: boom"):
        meteor_score(java, [["a b"]], ["a"], timeout_s=30)


@pytest.mark.slow
@needs_java
def test_score_captions_meteor_survives_hostile_captions_and_equals_pycocoevalcap() -> None:
    from pycocoevalcap.meteor.meteor import Meteor

    theirs = Meteor()  # pycocoevalcap's JVM loads its paraphrase table while ours runs
    try:
        report = score_captions(HOSTILE_GTS, HOSTILE_RES, metrics=("METEOR", "CIDEr"), java_timeout_s=120)
        assert report.unavailable == {} and report.official
        assert 0.0 <= report.scores["METEOR"] <= 1.0
        # pycocoevalcap's own Meteor on the same (sanitised, PTB-tokenised) captions gives the same number.
        java = find_java()
        assert java is not None
        ids = list(HOSTILE_GTS)
        flat = [sanitize_caption(c) for i in ids for c in HOSTILE_GTS[i]]
        flat += [sanitize_caption(HOSTILE_RES[i]) for i in ids]
        tokens = iter(ptb_tokenize(java, flat, timeout_s=120))
        gts = {i: [next(tokens) for _ in HOSTILE_GTS[i]] for i in ids}
        res = {i: [next(tokens)] for i in ids}
        expected, _ = theirs.compute_score(gts, res)
    finally:
        del theirs  # its __del__ kills its JVM
    assert report.scores["METEOR"] == pytest.approx(expected, abs=1e-12)
    assert _java_children() == []


@pytest.mark.slow
@needs_java
def test_shared_meteor_scores_several_corpora_as_separate_jvms_and_closes_its_jvm() -> None:
    other = {i: "a dog on a couch" for i in GTS}
    with shared_meteor(timeout_s=120) as meteor:
        assert meteor is not None
        shared = [score_captions(GTS, res, metrics=("METEOR",), meteor=meteor).scores["METEOR"] for res in (RES, other)]
        assert len(_java_children()) == 1  # the session's JVM, still running between the two reports
    alone = [score_captions(GTS, res, metrics=("METEOR",)).scores["METEOR"] for res in (RES, other)]
    assert shared == alone and shared[0] != shared[1]
    assert _java_children() == []


def test_shared_meteor_without_java_gives_none_and_reports_still_explain(no_java: None) -> None:
    with shared_meteor() as meteor:
        assert meteor is None
        report = score_captions(GTS, RES, metrics=("BLEU", "METEOR"), meteor=meteor)
    assert "java" in report.unavailable["METEOR"].lower() and "BLEU-4" in report.scores
