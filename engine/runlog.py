"""A training run's log: one JSON line per row in metrics.jsonl (what curves, reports and resumes read) and the same
figures as TensorBoard event files in run_dir/tensorboard/ for watching long runs (`tensorboard --logdir runs/`)."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"
_NOT_FIGURES = {"phase", "time", "type", "epoch", "it", "beam"}


class RunLog:
    """Rows of one phase's log. Only the main process writes; without the tensorboard package the event files are
    skipped (said once), metrics.jsonl is always written."""

    def __init__(self, run_dir: Path, phase: str, write: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.phase = phase
        self.write = write
        self._events = _event_writer(run_dir / TENSORBOARD_DIR) if write else None

    def row(self, row: dict[str, Any]) -> None:
        """Append a row ({"type": "train" | "val", "it": ..., figures}) to metrics.jsonl and its numbers to the event
        files (tag "train/loss", "val/cider_beam3", ...; step: the iteration)."""
        if not self.write:
            return
        row = {"phase": self.phase, "time": time.time(), **row}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._events is not None:
            suffix = f"_beam{row['beam']}" if "beam" in row else ""
            for key, value in row.items():
                if key not in _NOT_FIGURES and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._events.add_scalar(f"{row['type']}/{key}{suffix}", value, row["it"])
            self._events.flush()

    def captions(self, tag: str, lines: list[str], it: int) -> None:
        """A few sample captions (markdown lines) as a text entry of the event files."""
        if self._events is not None:
            self._events.add_text(tag, "\n\n".join(lines), it)
            self._events.flush()

    def rows(self) -> list[dict[str, Any]]:
        """Every row written so far (this run's and, after a resume, the earlier process's)."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def _event_writer(folder: Path) -> Any:
    """TensorBoard's SummaryWriter, or None when the optional tensorboard package is not installed."""
    try:  # optional: torch.utils.tensorboard needs the tensorboard package, which training does not
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("the tensorboard package is not installed: no event files (metrics.jsonl has every figure; "
                      "pip install tensorboard to watch runs live)", stacklevel=3)
        return None
    return SummaryWriter(log_dir=str(folder))
