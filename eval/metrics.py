"""COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE) computed one by one, offline, with Java timeouts."""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import unicodedata
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from eval.cider import CiderD

__all__ = [
    "DEFAULT_METRICS",
    "JavaStepError",
    "MetricReport",
    "find_java",
    "meteor_score",
    "ptb_tokenize",
    "python_tokenize",
    "sanitize_caption",
    "score_captions",
    "spice_missing_reason",
    "spice_score",
]

DEFAULT_METRICS: tuple[str, ...] = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")
SPICE_JARS: tuple[str, ...] = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
# pycocoevalcap's PTBTokenizer drops these tokens after tokenising (tokenizer/ptbtokenizer.py).
PTB_PUNCTUATIONS: frozenset[str] = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_METRIC_ALIASES = {
    "BLEU": "BLEU",
    "METEOR": "METEOR",
    "ROUGE": "ROUGE_L",
    "ROUGEL": "ROUGE_L",
    "CIDER": "CIDEr",
    "CIDERD": "CIDEr",
    "SPICE": "SPICE",
}
_SCORE_NAMES = {
    "BLEU": ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"),
    "METEOR": ("METEOR",),
    "ROUGE_L": ("ROUGE-L",),
    "CIDEr": ("CIDEr-D",),
    "SPICE": ("SPICE",),
}
_OPENED_PACKAGES = ("java.lang", "java.util", "java.math", "java.net")  # reflected on by SPICE's serialisers
_JAVA_OPENS = tuple(f"--add-opens=java.base/{pkg}=ALL-UNNAMED" for pkg in _OPENED_PACKAGES)


@dataclass
class MetricReport:
    """Scores on pycocoevalcap's raw scale (CIDEr-D ~1.3 for good models), and why any metric is missing.

    ``official`` is True only when captions went through pycocoevalcap's Java PTB tokenizer. ``notes`` holds
    remarks that do not make a metric unavailable (e.g. why the Python tokenizer was used).
    """

    scores: dict[str, float]
    unavailable: dict[str, str]
    tokenizer: str
    official: bool
    notes: dict[str, str] = field(default_factory=dict)


class JavaStepError(RuntimeError):
    """A Java subprocess failed, timed out or answered something unexpected."""


@functools.lru_cache(maxsize=1)
def find_java() -> str | None:
    """Path of a working ``java`` on PATH (checked once with ``java -version``), or None."""
    java = shutil.which("java")
    if java is None or _java_major_version(java) is None:
        return None
    return java


@functools.lru_cache(maxsize=4)
def _java_major_version(java: str) -> int | None:
    """Major version of ``java`` (8 for 1.8, 17 for 17.0.x), or None when it does not run."""
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60, errors="replace")
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', proc.stderr + proc.stdout)
    if match is None:
        return 0  # runs, unknown version: assume an old one (no module flags)
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


_LINE_BREAKING = frozenset({"Cc", "Zl", "Zp"})  # control characters and line/paragraph separators: become spaces
_INVISIBLE = frozenset({"Cf", "Cs"})  # format characters (zero-width, BOM) and lone surrogates: dropped


def _clean_char(ch: str) -> str:
    """One character as sanitize_caption keeps it: itself, a space or nothing."""
    if ch.isascii() and ch.isprintable():
        return ch
    category = unicodedata.category(ch)
    if category in _LINE_BREAKING:
        return " "
    return "" if category in _INVISIBLE else ch


def sanitize_caption(text: str) -> str:
    """Remove newlines, '|||', control and format characters, and collapse whitespace.

    Java's PTBTokenizer treats \\r, \\v, \\f, U+0085, U+2028 and U+2029 as line ends (captions would shift lines) and
    METEOR uses '|||' as its field separator, so both must go before any Java step.
    """
    if not isinstance(text, str):
        raise TypeError(f"a caption must be a str, got {type(text).__name__}")
    cleaned = text if text.isascii() and text.isprintable() else "".join(map(_clean_char, text))
    while "|||" in cleaned:
        cleaned = cleaned.replace("|||", " ")
    return " ".join(cleaned.split())


_DASHES = re.compile(r"[\u2012\u2013\u2014\u2015]")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ALWAYS_SPLIT = re.compile(r"""([()\[\]{};"]|[!?]+|\.\.\.+|--+)""")
_COMMA_COLON = re.compile(r"(?<!\d)([,:])|([,:])(?!\d)")
_CURRENCY_HASH = re.compile(r"(^|\s)([$#])")
_PERCENT = re.compile(r"%(?=\s|$)")
_ABBREVIATION = re.compile(
    r"^(?:[a-z]\.)+$|^(?:mr|mrs|ms|dr|jr|sr|st|vs|etc|inc|ltd|mt|ft|prof|gen|sgt|capt|lt|col|rev)\.$"
)
_CONTRACTION = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_ONLY_PUNCT = re.compile(r"^[.,:;`'\-]+$|^[!?]$")


def python_tokenize(text: str) -> str:
    """Pure-Python approximation of PTBTokenizer (-lowerCase) plus pycocoevalcap's punctuation removal.

    Used only when Java is missing or fails; matches the Java tokenizer on ordinary English captions, including its
    quirks: brackets stay as -lrb- style tokens, "!!" and "?!" stay, abbreviations keep their period.
    """
    text = sanitize_caption(text).lower()
    text = _DASHES.sub(" -- ", text).replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"')
    text = text.replace("\u201d", '"').replace("\u2026", " ... ")
    text = _ALWAYS_SPLIT.sub(r" \1 ", text)
    text = _COMMA_COLON.sub(lambda m: f" {m.group(1) or m.group(2)} ", text)
    text = _CURRENCY_HASH.sub(r"\1\2 ", text)
    text = _PERCENT.sub(" %", text)
    tokens: list[str] = []
    for raw in text.split():
        if raw in _BRACKETS:
            tokens.append(_BRACKETS[raw])
            continue
        word = raw.strip("`'\"") if raw not in {"'s", "'re", "'ve", "'ll", "'d", "'m", "n't"} else raw
        if not _ABBREVIATION.match(word):
            word = word.rstrip(".")
        match = _CONTRACTION.match(word)
        parts = [match.group(1), match.group(2)] if match and match.group(1) not in {"'", ""} else [word]
        for part in parts:
            if part and part not in PTB_PUNCTUATIONS and not _ONLY_PUNCT.match(part):
                tokens.append(part)
    return " ".join(tokens)


def _package_dir(module: str) -> Path:
    """Directory of a pycocoevalcap subpackage, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{module} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _java_base_cmd(java: str, heap: str | None = None) -> list[str]:
    """``java`` with UTF-8 and an English locale (lower-casing and number formats must not depend on the machine)."""
    cmd = [java, "-Dfile.encoding=UTF-8", "-Duser.language=en", "-Duser.country=US"]
    if heap:
        cmd.append(f"-Xmx{heap}")
    return cmd


def _stderr_tail(text: str, limit: int = 400) -> str:
    """The telling lines of a Java error output (exception messages, else the last lines), shortened for a report."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    telling = [line for line in lines if not line.startswith(("at ", "..."))]
    return " | ".join(telling[-3:] or lines[-3:])[-limit:] or "no error output"


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill a process started with start_new_session=True and everything it spawned (wrapper scripts included)."""
    if proc.returncode is not None:  # already reaped: its pid may have been reused
        return
    if os.name == "posix":
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    else:
        proc.kill()


def _run_java(cmd: list[str], timeout_s: float, cwd: str | os.PathLike[str], what: str) -> tuple[int, bytes, bytes]:
    """Run a Java command to completion; on timeout kill its whole process group. Returns (exit code, out, err)."""
    try:
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise JavaStepError(f"{what} could not start: {exc}") from exc
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc)
        proc.communicate()
        raise JavaStepError(f"{what} timed out after {timeout_s:g} s (JVM killed)") from exc
    finally:
        if proc.poll() is None:
            _kill_group(proc)
            proc.wait()
    return proc.returncode, out, err


def ptb_tokenize(java: str, captions: Sequence[str], timeout_s: float) -> list[str]:
    """Tokenise with pycocoevalcap's Stanford PTBTokenizer jar, then drop punctuation exactly like pycocoevalcap.

    Runs one JVM for all captions (one per line, already sanitised) with a timeout; raises JavaStepError on failure.
    """
    jar = _package_dir("pycocoevalcap.tokenizer") / "stanford-corenlp-3.4.1.jar"
    if not jar.is_file():
        raise JavaStepError(f"PTB tokenizer jar missing: {jar}")
    with tempfile.TemporaryDirectory(prefix="ptb_") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_text("\n".join(captions) + "\n", encoding="utf-8")
        cmd = _java_base_cmd(java) + ["-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer"]
        cmd += ["-preserveLines", "-lowerCase", str(path)]
        code, out, err = _run_java(cmd, timeout_s, tmp, "PTB tokenizer")
    if code != 0:
        raise JavaStepError(f"PTB tokenizer exited with {code}: {_stderr_tail(err.decode(errors='replace'))}")
    lines = out.decode("utf-8", errors="replace").split("\n")
    if len(lines) < len(captions) or any(line.strip() for line in lines[len(captions) :]):
        raise JavaStepError(f"PTB tokenizer returned {len(lines)} lines for {len(captions)} captions")
    lines = lines[: len(captions)]
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATIONS) for line in lines]


def meteor_score(java: str, gts: Sequence[Sequence[str]], res: Sequence[str], timeout_s: float) -> float:
    """METEOR 1.5 of one corpus in a JVM of its own (see MeteorSession)."""
    with MeteorSession(java, timeout_s) as meteor:
        return meteor.score(gts, res)


class MeteorSession:
    """One METEOR 1.5 JVM (pycocoevalcap's jar and line protocol: SCORE per image, then one EVAL line) that scores
    several corpora: starting it and loading its paraphrase tables takes about 10 s, scoring 500 captions 1 s.

    The JVM is killed when the session outlives ``timeout_s`` (a hang then reads as end-of-file) and always cleaned
    up on close; stderr goes to a file so that it can never fill a pipe and block the JVM.
    """

    def __init__(self, java: str, timeout_s: float) -> None:
        cmd, meteor_dir = _meteor_command(java)
        self.timeout_s = timeout_s
        self._err = tempfile.TemporaryFile()
        try:
            self._proc = _start_meteor(cmd, meteor_dir, self._err)
        except BaseException:
            self._err.close()
            raise
        self._timer, self._timed_out = _kill_after(self._proc, timeout_s)

    def score(self, gts: Sequence[Sequence[str]], res: Sequence[str]) -> float:
        """Corpus METEOR of res (one tokenised caption per image) against gts (its tokenised references)."""
        try:
            return _meteor_exchange(self._proc, gts, res)
        except (EOFError, BrokenPipeError, OSError, ValueError) as exc:
            raise _meteor_failure(self._proc, self._err, exc, self._timed_out.is_set(), self.timeout_s) from exc

    def close(self) -> None:
        self._timer.cancel()
        _close_meteor(self._proc)
        self._err.close()

    def __enter__(self) -> MeteorSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def shared_meteor(timeout_s: float = 300.0) -> Iterator[MeteorSession | None]:
    """A METEOR session for several score_captions calls, or None where Java or METEOR cannot start (each call then
    says why METEOR is unavailable, as without a session)."""
    java = find_java()
    try:
        session = MeteorSession(java, timeout_s) if java is not None else None
    except JavaStepError:
        session = None
    try:
        yield session
    finally:
        if session is not None:
            session.close()


def _meteor_command(java: str) -> tuple[list[str], Path]:
    """METEOR 1.5's stdio-mode command line and the folder it runs in (pycocoevalcap's, where its data lies)."""
    meteor_dir = _package_dir("pycocoevalcap.meteor")
    jar = meteor_dir / "meteor-1.5.jar"
    if not jar.is_file():
        raise JavaStepError(f"METEOR jar missing: {jar}")
    return _java_base_cmd(java, "2G") + ["-jar", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"], meteor_dir


def _start_meteor(cmd: list[str], cwd: Path, err: IO[bytes]) -> subprocess.Popen:
    """Start the METEOR JVM in its own process group (so that it can be killed whole), stderr into ``err``."""
    try:
        return subprocess.Popen(
            cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, start_new_session=True
        )
    except OSError as exc:
        raise JavaStepError(f"METEOR could not start: {exc}") from exc


def _kill_after(proc: subprocess.Popen, timeout_s: float) -> tuple[threading.Timer, threading.Event]:
    """A started timer that kills proc's process group after ``timeout_s``, and the event it sets first."""
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        _kill_group(proc)

    timer = threading.Timer(timeout_s, kill)
    timer.daemon = True
    timer.start()
    return timer, timed_out


def _meteor_ask(proc: subprocess.Popen, line: str, answers: int = 1) -> list[str]:
    """Send one protocol line and read ``answers`` reply lines; EOFError when the JVM has closed its output."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write((line + "\n").encode("utf-8"))
    proc.stdin.flush()
    out = []
    for _ in range(answers):
        reply = proc.stdout.readline()
        if not reply:
            raise EOFError
        out.append(reply.decode("utf-8", errors="replace").strip())
    return out


def _meteor_exchange(proc: subprocess.Popen, gts: Sequence[Sequence[str]], res: Sequence[str]) -> float:
    """One SCORE line per image (its stats), then EVAL of all the stats, whose last answer is the corpus METEOR."""
    stats = []
    for refs, hyp in zip(gts, res):
        fields = [r.replace("|||", "") for r in refs] + [hyp.replace("|||", "").replace("  ", " ")]
        stats.append(_meteor_ask(proc, " ||| ".join(["SCORE", *fields]))[0])
    answers = _meteor_ask(proc, " ||| ".join(["EVAL", *stats]), answers=len(stats) + 1)
    return float(answers[-1])


def _meteor_failure(
    proc: subprocess.Popen, err: IO[bytes], exc: BaseException, timed_out: bool, timeout_s: float
) -> JavaStepError:
    """The error for a broken exchange: the timeout, else whether the JVM exited, and the tail of its stderr."""
    if timed_out:
        return JavaStepError(f"METEOR timed out after {timeout_s:g} s (JVM killed)")
    exit_code = proc.poll()
    _kill_group(proc)
    proc.wait()
    err.seek(0)
    tail = _stderr_tail(err.read().decode(errors="replace"))
    what = "JVM exited" if exit_code is not None else f"{type(exc).__name__}: {exc}"
    return JavaStepError(f"METEOR failed ({what}): {tail}")


def _close_meteor(proc: subprocess.Popen) -> None:
    """Close the pipes, then kill and reap the JVM's process group, whatever state the exchange left it in."""
    for stream in (proc.stdin, proc.stdout):
        try:
            stream.close()
        except OSError:
            pass
    _kill_group(proc)
    proc.wait()

def spice_missing_reason(spice_dir: str | os.PathLike[str] | None) -> str | None:
    """Why SPICE cannot run with ``spice_dir`` (None when the CoreNLP 3.6.0 jars are there)."""
    how = (
        "SPICE is opt-in and never downloads anything: pass spice_dir=<folder> holding "
        + " and ".join(SPICE_JARS)
        + " (from stanford-corenlp-full-2015-12-09.zip)"
    )
    if spice_dir is None:
        return f"{how}; no spice_dir given"
    folder = Path(spice_dir)
    missing = [name for name in SPICE_JARS if not (folder / name).is_file()]
    if missing:
        return f"{how}; missing in {folder}: {', '.join(missing)}"
    return None


def spice_score(
    java: str, gts: Sequence[Sequence[str]], res: Sequence[str], spice_dir: str | os.PathLike[str], timeout_s: float
) -> tuple[float, str | None]:
    """SPICE 1.0 run from pycocoevalcap's jar with the user's CoreNLP jars on the classpath; returns (score, note).

    pycocoevalcap's Spice() is bypassed because it downloads CoreNLP into site-packages when the jar is absent.
    No LMDB cache (-cache breaks on Java 9+); module-opening flags on Java 9+. SPICE 1.0 writes its JSON through
    the JavaScript engine that Java 15 removed: there, unless spice_dir also holds a nashorn jar, the score is the
    3-decimal macro-average that SPICE prints (images with an undefined F-score skipped).
    """
    spice_pkg = _package_dir("pycocoevalcap.spice")
    folder = Path(spice_dir)
    user_jars = [str(folder / name) for name in SPICE_JARS]
    extra = sorted(p for p in glob.glob(str(folder / "*.jar")) if Path(p).name not in SPICE_JARS)
    classpath = [str(spice_pkg / "spice-1.0.jar"), *sorted(glob.glob(str(spice_pkg / "lib" / "*.jar"))), *user_jars]
    major = _java_major_version(java) or 0
    has_js = major < 15 or any("nashorn" in Path(p).name.lower() for p in extra)
    cmd = _java_base_cmd(java, "8G") + (list(_JAVA_OPENS) if major >= 9 else [])
    cmd += ["-cp", os.pathsep.join(classpath + extra), "edu.anu.spice.SpiceScorer"]
    with tempfile.TemporaryDirectory(prefix="spice_") as tmp:
        in_path, out_path = Path(tmp) / "input.json", Path(tmp) / "output.json"
        data = [{"image_id": i, "test": hyp, "refs": list(refs)} for i, (refs, hyp) in enumerate(zip(gts, res))]
        in_path.write_text(json.dumps(data), encoding="utf-8")
        cmd += [str(in_path), "-subset"] + (["-out", str(out_path), "-silent"] if has_js else [])
        code, out, err = _run_java(cmd, timeout_s, tmp, "SPICE")
        if code != 0:
            raise JavaStepError(f"SPICE exited with {code}: {_stderr_tail(err.decode(errors='replace'))}")
        if has_js:
            results = json.loads(out_path.read_text(encoding="utf-8"))
            return float(np.mean([_as_float(item["scores"]["All"]["f"]) for item in results])), None
    match = re.search(r"All tuples\s+f-score:\s*([-\w.]+)", out.decode(errors="replace"))
    if match is None:
        raise JavaStepError("SPICE printed no 'All tuples' f-score")
    note = f"SPICE read from its printed summary (3 decimals): Java {major} has no JavaScript engine for -out"
    return _as_float(match.group(1)), note


def _as_float(value: object) -> float:
    """float(value), NaN when not a number (as pycocoevalcap's Spice.float_convert)."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def _canonical_metrics(metrics: Sequence[str]) -> list[str]:
    """Map user metric names (case, '-' and '_' ignored; BLEU-4, ROUGE-L, CIDEr-D accepted) to canonical ones."""
    out: list[str] = []
    for name in metrics:
        key = re.sub(r"[-_\s]", "", str(name)).upper()
        key = "BLEU" if re.fullmatch(r"BLEU\d?", key) else key
        if key not in _METRIC_ALIASES:
            raise ValueError(f"unknown metric {name!r}; known: BLEU, METEOR, ROUGE_L, CIDEr, SPICE")
        if _METRIC_ALIASES[key] not in out:
            out.append(_METRIC_ALIASES[key])
    return out


def _check_inputs(
    gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, str | Sequence[str]]
) -> tuple[list[Hashable], list[list[str]], list[str]]:
    """Validate that gts and res cover the same images; returns (ids, refs per id, hypothesis per id)."""
    if not gts:
        raise ValueError("no references to score against")
    missing, extra = [k for k in gts if k not in res], [k for k in res if k not in gts]
    if missing or extra:
        raise ValueError(
            f"ids differ: {len(missing)} without a caption (e.g. {missing[:3]}), "
            f"{len(extra)} unknown (e.g. {extra[:3]})"
        )
    ids = list(gts)
    refs, hyps = [], []
    for key in ids:
        image_refs = gts[key]
        if isinstance(image_refs, str) or len(image_refs) == 0:
            raise ValueError(f"image {key!r}: references must be a non-empty list of strings")
        hyp = res[key]
        if not isinstance(hyp, str):
            if len(hyp) != 1:
                raise ValueError(f"image {key!r}: expected one caption, got {len(hyp)}")
            hyp = hyp[0]
        refs.append(list(image_refs))
        hyps.append(hyp)
    return ids, refs, hyps


def _bleu(refs: list[list[str]], hyps: list[str]) -> dict[str, float]:
    """BLEU-1..4 from pycocoevalcap (option 'closest', as COCOEvalCap)."""
    from pycocoevalcap.bleu.bleu import Bleu

    scores, _ = Bleu(4).compute_score(_as_gts(refs), _as_res(hyps), verbose=0)
    return {f"BLEU-{i + 1}": float(s) for i, s in enumerate(scores)}


def _rouge(refs: list[list[str]], hyps: list[str]) -> dict[str, float]:
    """ROUGE-L (beta 1.2) from pycocoevalcap."""
    from pycocoevalcap.rouge.rouge import Rouge

    score, _ = Rouge().compute_score(_as_gts(refs), _as_res(hyps))
    return {"ROUGE-L": float(score)}


def _cider(refs: list[list[str]], hyps: list[str]) -> dict[str, float]:
    """CIDEr-D with document frequencies from these references (equals pycocoevalcap's Cider)."""
    score, _ = CiderD().score(hyps, refs)
    return {"CIDEr-D": float(score)}


def _as_gts(refs: list[list[str]]) -> dict[int, list[str]]:
    """References in pycocoevalcap's {id: [caption, ...]} layout."""
    return dict(enumerate(refs))


def _as_res(hyps: list[str]) -> dict[int, list[str]]:
    """Hypotheses in pycocoevalcap's {id: [caption]} layout."""
    return {i: [h] for i, h in enumerate(hyps)}


def score_captions(
    gts: Mapping[Hashable, Sequence[str]],
    res: Mapping[Hashable, str | Sequence[str]],
    metrics: Sequence[str] = DEFAULT_METRICS,
    spice_dir: str | os.PathLike[str] | None = None,
    java_timeout_s: float = 300.0,
    meteor: MeteorSession | None = None,
) -> MetricReport:
    """Score one caption per image (res) against its references (gts), each metric on its own.

    Captions are sanitised, then PTB-tokenised with Java (official) or, without a working Java, with
    ``python_tokenize`` (not official; METEOR and SPICE then unavailable). A failing metric lands in
    ``unavailable`` with its reason and never stops the others. Each Java step is killed after ``java_timeout_s``.
    meteor: a session (shared_meteor) to score METEOR in, when several calls should share one JVM.
    """
    wanted = _canonical_metrics(metrics)
    _, raw_refs, raw_hyps = _check_inputs(gts, res)
    raw_refs = [[sanitize_caption(c) for c in image_refs] for image_refs in raw_refs]
    raw_hyps = [sanitize_caption(h) for h in raw_hyps]
    report = MetricReport(scores={}, unavailable={}, tokenizer="python", official=False)
    java = find_java()
    refs, hyps, no_java_reason = _tokenize_for_report(java, raw_refs, raw_hyps, java_timeout_s, report)
    for metric in wanted:
        try:
            if (reason := _why_unavailable(metric, report.official, spice_dir, no_java_reason)) is not None:
                raise JavaStepError(reason)
            scores, note = _run_metric(metric, refs, hyps, java, spice_dir, java_timeout_s, meteor)
            report.scores.update(scores)
            if note:
                report.notes[metric] = note
        except Exception as exc:  # one failing metric must not erase the others
            _mark_unavailable(report, metric, exc)
    return report


def _tokenize_for_report(
    java: str | None, raw_refs: list[list[str]], raw_hyps: list[str], timeout_s: float, report: MetricReport
) -> tuple[list[list[str]], list[str], str]:
    """PTB-tokenise with Java (report marked official), else python_tokenize (noted): (refs, hyps, why no Java)."""
    no_java_reason = "java not found on PATH (install a JRE; Java 8 for SPICE)" if java is None else ""
    if java is not None:
        flat = [c for image_refs in raw_refs for c in image_refs] + raw_hyps
        try:
            tokens = ptb_tokenize(java, flat, timeout_s)
        except Exception as exc:  # any tokenizer failure falls back to Python
            no_java_reason = f"PTB tokenizer failed: {exc}"
        else:
            it = iter(tokens)
            refs = [[next(it) for _ in image_refs] for image_refs in raw_refs]
            hyps = [next(it) for _ in raw_hyps]
            report.tokenizer, report.official = "ptb", True
            return refs, hyps, no_java_reason
    report.notes["tokenizer"] = f"python_tokenize used, scores not official: {no_java_reason}"
    logging.getLogger(__name__).warning("caption metrics: %s", report.notes["tokenizer"])
    refs = [[python_tokenize(c) for c in image_refs] for image_refs in raw_refs]
    hyps = [python_tokenize(h) for h in raw_hyps]
    return refs, hyps, no_java_reason


def _why_unavailable(
    metric: str, official: bool, spice_dir: str | os.PathLike[str] | None, no_java_reason: str
) -> str | None:
    """Why ``metric`` cannot run at all (SPICE jars missing; METEOR or SPICE without Java), or None."""
    if metric == "SPICE" and (reason := spice_missing_reason(spice_dir)) is not None:
        return reason
    if metric in ("METEOR", "SPICE") and not official:
        return f"{metric} needs Java and the PTB tokenizer: {no_java_reason}"
    return None


def _run_metric(
    metric: str,
    refs: list[list[str]],
    hyps: list[str],
    java: str | None,
    spice_dir: str | os.PathLike[str] | None,
    timeout_s: float,
    meteor: MeteorSession | None = None,
) -> tuple[dict[str, float], str | None]:
    """Compute one canonical metric on tokenised captions: (its scores by name, a note or None)."""
    if metric == "BLEU":
        return _bleu(refs, hyps), None
    if metric == "ROUGE_L":
        return _rouge(refs, hyps), None
    if metric == "CIDEr":
        return _cider(refs, hyps), None
    if metric == "METEOR":
        assert java is not None
        if meteor is not None:
            return {"METEOR": meteor.score(refs, hyps)}, None
        return {"METEOR": meteor_score(java, refs, hyps, timeout_s)}, None
    assert java is not None and spice_dir is not None  # SPICE
    score, note = spice_score(java, refs, hyps, spice_dir, timeout_s)
    return {"SPICE": score}, note


def _mark_unavailable(report: MetricReport, metric: str, exc: Exception) -> None:
    """Record why ``metric`` failed under each of its score names (dropping any partial score) and log it."""
    reason = str(exc) if isinstance(exc, JavaStepError) else f"{type(exc).__name__}: {exc}"
    for name in _SCORE_NAMES[metric]:
        report.unavailable[name] = reason
        report.scores.pop(name, None)
    logging.getLogger(__name__).warning("caption metrics: %s unavailable: %s", metric, reason)
