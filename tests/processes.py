"""Run a command the way the tests need: to completion however slow the machine is, failing only when it hangs.

A fixed wall-clock limit fails an honest run on a loaded machine (issue 21: the quickstart took 918 s alone under a
load of 3.5 and was killed by its own 1,500 s limit while another job shared the cores). A run is hung when it stops
making progress: it writes nothing to stdout or stderr and changes no file under the watched folders for ``stall_s``.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

STALL_S = 600.0  # ten minutes without a byte of output or a written file: far above any quiet stretch of these runs


def run_watched(cmd: Sequence[str], *, cwd: Path | str | None = None, env: Mapping[str, str] | None = None,
                watch: Iterable[Path] = (), stall_s: float = STALL_S) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` that kills the command and raises
    ``subprocess.TimeoutExpired`` once it has made no progress (output, or a file written under ``watch``) for
    ``stall_s`` seconds; a slow run that keeps progressing is never cut short."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=None if env is None else dict(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace")
    chunks: dict[str, list[str]] = {"stdout": [], "stderr": []}
    last_output = [time.monotonic()]

    def drain(stream, sink: list[str]) -> None:
        for line in iter(stream.readline, ""):
            sink.append(line)
            last_output[0] = time.monotonic()
        stream.close()

    readers = [threading.Thread(target=drain, args=(getattr(proc, name), sink), daemon=True)
               for name, sink in chunks.items()]
    for reader in readers:
        reader.start()
    folders = [Path(p) for p in watch]
    last_write, next_scan = _latest_write(folders), time.monotonic() + 10.0
    while proc.poll() is None:
        time.sleep(0.5)
        now = time.monotonic()
        if now >= next_scan:
            latest = _latest_write(folders)
            if latest > last_write:
                last_write, last_output[0] = latest, now
            next_scan = now + 10.0
        if now - last_output[0] > stall_s:
            proc.kill()
            proc.wait()
            for reader in readers:
                reader.join(timeout=10)
            raise subprocess.TimeoutExpired(list(cmd), stall_s, output="".join(chunks["stdout"]),
                                            stderr="".join(chunks["stderr"]))
    for reader in readers:
        reader.join()
    return subprocess.CompletedProcess(list(cmd), proc.returncode, "".join(chunks["stdout"]), "".join(chunks["stderr"]))


def wait_while_progressing(condition: Callable[[], bool], process: subprocess.Popen, watch: Iterable[Path],
                           stall_s: float = STALL_S) -> bool:
    """Poll until ``condition()`` holds (True) or the process exits (False); raise TimeoutError when no file under
    ``watch`` changed for ``stall_s`` seconds (the process hangs), never because the machine is slow."""
    folders = [Path(p) for p in watch]
    last_write, last_progress, next_scan = _latest_write(folders), time.monotonic(), 0.0
    while not condition():
        if process.poll() is not None:
            return False
        now = time.monotonic()
        if now >= next_scan:
            latest = _latest_write(folders)
            if latest > last_write:
                last_write, last_progress = latest, now
            next_scan = now + 5.0
        if now - last_progress > stall_s:
            raise TimeoutError(f"no file under {[str(f) for f in folders]} changed for {stall_s:g} s")
        time.sleep(0.05)
    return True


def _latest_write(folders: list[Path]) -> float:
    """The newest modification time (ns) of any file under the folders, 0 when there is none."""
    latest = 0
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                try:
                    latest = max(latest, os.stat(os.path.join(root, name)).st_mtime_ns)
                except OSError:  # removed or renamed while walking (an atomic save)
                    continue
    return float(latest)
