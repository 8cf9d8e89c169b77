"""Run every benchmark with its CPU defaults, one after the other (`make bench`); each prints figure and ratio."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_decoding.py", "bench_onnx.py", "bench_train_step.py", "bench_cider.py", "bench_data.py",
           "bench_serving.py", "bench_serving_guard.py"]


def main() -> int:
    failed = []
    for script in SCRIPTS:
        print(f"== {script}", flush=True)
        t0 = time.perf_counter()
        if subprocess.run([sys.executable, str(HERE / script)], cwd=HERE.parent).returncode != 0:
            failed.append(script)
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
