"""What the benchmark scripts share: the repository root on sys.path (importing this module puts it there), timing
(medians of repeated calls, synchronised on a GPU), the seed captioner at a chosen backbone size, and the JSON
record of the printed figures (`--json PATH`)."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def median_seconds(fn: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None,
                   warmup: int = 0) -> float:
    """Median wall time of `repeats` calls of fn after `warmup` untimed ones; sync() brackets each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def end_to_end_config(name: str = "optimizer_expansionnet", backbone: str = "", img_size: int = 0) -> Any:
    """The named captioner end to end (optimizer_expansionnet: SwinV2-B, expansionnet_v2: Swin-L), or on another
    named backbone size (models.config.BACKBONE_SIZES, e.g. swinv2_tiny for a quick dry run), at img_size (0: the
    backbone's own)."""
    from dataclasses import replace

    from models import expansionnet_v2_config, optimizer_expansionnet_config
    from models.backbone import backbone_output_shape
    from models.config import backbone_preset

    cfg = expansionnet_v2_config() if name == "expansionnet_v2" else optimizer_expansionnet_config()
    if not backbone and (not img_size or img_size == cfg.backbone.img_size):
        return cfg
    bb = backbone_preset(backbone, img_size=img_size) if backbone else replace(cfg.backbone, img_size=img_size)
    return replace(cfg, backbone=bb, img_feature_dim=backbone_output_shape(bb)[1])


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def device_name(device: Any) -> str:
    """The GPU's name, or the CPU's model name."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU ({line.split(':', 1)[1].strip()}, {os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment(device: Any = "cpu") -> dict[str, Any]:
    """Device, versions and threads of this run (what a figure needs beside it to be compared)."""
    import torch

    return {"device": str(device), "device_name": device_name(device), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "timm": package_version("timm"),
            "torchvision": package_version("torchvision"), "torch_threads": torch.get_num_threads(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


class JsonFigures:
    """The figures a benchmark prints, kept as JSON at `path` (nothing when path is empty) with the environment and
    the run's settings (precision, batch sizes...). Written again after each figure, so that a run cut short (a
    timeout, an out-of-memory) keeps what it had measured."""

    def __init__(self, path: str | None, script: str, device: Any, settings: dict[str, Any]) -> None:
        self.path = Path(path) if path else None
        self.record: dict[str, Any] = {"script": script, "environment": environment(device), "settings": settings,
                                       "figures": {}, "complete": False}
        self.write()

    def add(self, *keys: str, values: dict[str, Any]) -> None:
        """figures[keys[0]][keys[1]]... = values (nan as null), and the file written again."""
        node = self.record["figures"]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}
        self.write()

    def finish(self) -> None:
        """Every figure of the run is in: marked complete."""
        self.record["complete"] = True
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=2, default=str) + "\n")
        tmp.replace(self.path)


def start_run(args: Any, script: str, note: str = "") -> tuple[Any, Callable[[], None], JsonFigures]:
    """What every benchmark does first: its device (args.device), the synchronisation its timings bracket calls with,
    its JSON record (args.json), and the header line naming device, torch and threads (+ note)."""
    import torch

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    figures = JsonFigures(args.json, script, device, vars(args))
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads{note}")
    return device, sync, figures


def write_results(path: str | None, results: dict[str, Any]) -> dict[str, Any]:
    """The results dict, also written as JSON to path when one is given (the serving benchmarks' --output)."""
    if path:
        Path(path).write_text(json.dumps(results, indent=2))
    return results


def add_backbone_flags(parser: Any, what: str, default: str = "") -> None:
    """--img_size and --backbone (a named size of models.config.BACKBONE_SIZES) for `what` a benchmark times."""
    parser.add_argument("--img_size", type=int, default=384, help=f"image side of {what}")
    parser.add_argument("--backbone", default=default,
                        help=f"named backbone size of {what} (models.config.BACKBONE_SIZES; swinv2_tiny for a quick "
                             "dry run" + ("" if default else "; default: each model's own") + ")")
