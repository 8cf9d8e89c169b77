"""Hostile uploads refused before decoding: CPU time of the format and header checks (serving.imageguard) against
decoding the same files, and /health latency on a real server while 16 of them arrive at once."""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import write_results  # puts the repository root on sys.path


@dataclass(frozen=True)
class BenchConfig:
    repeats: int
    decode: bool
    server_root: str | None
    burst_files: int
    output: str | None


def parse_config(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=2000, help="timed check calls per upload")
    p.add_argument("--no-decode", dest="decode", action="store_false",
                   help="skip decoding the 1 x 39,000,000 PNG with Pillow (the cost the checks avoid: seconds)")
    p.add_argument("--server_root", default=None,
                   help="also time /health while one /predicts of hostile strips runs on api.py served from this "
                        "checkout (e.g. one of the code before the checks, for a before/after figure)")
    p.add_argument("--burst_files", type=int, default=4, help="strip PNGs in that /predicts (6-7 s each to decode)")
    p.add_argument("--output", default=None, help="also write the results as JSON to this file")
    a = p.parse_args(argv)
    return BenchConfig(a.repeats, a.decode, a.server_root, a.burst_files, a.output)


def hostile_uploads() -> dict[str, bytes]:
    """The issue's strip PNG, an EPS, a JPEG declaring 65,000 x 65,000, a BMP declaring 100,000 x 1."""
    import struct

    from PIL import Image

    from serving.testing import image_bytes, sparse_png

    eps = io.BytesIO()
    Image.new("RGB", (8, 8)).save(eps, "EPS")
    jpeg = bytearray(image_bytes((64, 48), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 65000, 65000)
    bmp = b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack("<IiiHH", 40, 100_000, 1, 1, 24) + b"\0" * 64
    return {"png 1 x 39,000,000 (76 kB)": sparse_png(1, 39_000_000), "eps": eps.getvalue(),
            "jpeg declaring 65,000 x 65,000": bytes(jpeg), "bmp declaring 100,000 x 1": bmp}


def cpu_seconds_per_call(fn: Callable[[], object], repeats: int) -> float:
    """Median CPU time (process time) of one call, from blocks of 100 calls."""
    blocks = []
    for _ in range(max(1, repeats // 100)):
        start = time.process_time_ns()
        for _ in range(100):
            fn()
        blocks.append((time.process_time_ns() - start) / 100 / 1e9)
    return statistics.median(blocks)


def refusal_cost(data: bytes) -> Callable[[], object]:
    from fastapi import HTTPException

    from serving.imageguard import ImageLimits, check_upload

    limits = ImageLimits(40_000_000, 16_384, 20.0)

    def refuse() -> object:
        try:
            check_upload(data, "upload", limits)
        except HTTPException as exc:
            return exc.status_code
        raise AssertionError("the upload was not refused")

    return refuse


def decode_seconds(data: bytes) -> float:
    """CPU time Pillow takes to decode the upload (what a total-pixel check alone let through)."""
    from PIL import Image

    start = time.process_time()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
    return time.process_time() - start


def health_during_hostile_upload(server_root: str, strip: bytes, files: int) -> dict[str, object]:
    """/health latency (ms) while one /predicts of ``files`` strip PNGs runs on api.py served from server_root."""
    import httpx

    from benchmarks.bench_serving import make_checkpoint
    from serving.testing import uvicorn_server

    root = Path(server_root).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        env = {"CAPTION_CHECKPOINT": str(make_checkpoint(Path(tmp), 64))}
        with uvicorn_server("api:app", env, Path(tmp) / "server.log", app_dir=root) as server:
            async def run() -> tuple[list[float], int, float]:
                async with httpx.AsyncClient(base_url=server.base_url, timeout=900) as client:
                    upload = [("files", (f"{i}.png", strip, "image/png")) for i in range(files)]
                    start = time.perf_counter()
                    post = asyncio.create_task(client.post("/predicts", files=upload))
                    latencies = []
                    while not post.done() or not latencies:
                        t0 = time.perf_counter()
                        await client.get("/health")
                        latencies.append(1000 * (time.perf_counter() - t0))
                        await asyncio.sleep(0.05)
                    return latencies, (await post).status_code, time.perf_counter() - start

            latencies, status, seconds = asyncio.run(run())
    return {"health_p50_ms": statistics.median(latencies), "health_max_ms": max(latencies), "status": status,
            "answered_in_s": seconds}


def main(cfg: BenchConfig) -> dict[str, object]:
    uploads = hostile_uploads()
    results: dict[str, object] = {"config": vars(cfg)}
    print("CPU time to refuse a hostile upload (format and header checks, before any decoding):")
    for name, data in uploads.items():
        seconds = cpu_seconds_per_call(refusal_cost(data), cfg.repeats)
        results[name] = {"refuse_us": 1e6 * seconds}
        print(f"  {name:>32}: {1e6 * seconds:7.1f} us")
    strip = next(iter(uploads.values()))
    if cfg.decode:
        decode = decode_seconds(strip)
        results["decode_strip_s"] = decode
        ratio = decode / (results["png 1 x 39,000,000 (76 kB)"]["refuse_us"] / 1e6)  # type: ignore[index]
        print(f"  decoding the 1 x 39,000,000 PNG instead: {decode:.2f} s of CPU ({ratio:,.0f}x the refusal)")
    if cfg.server_root:
        burst = health_during_hostile_upload(cfg.server_root, strip, cfg.burst_files)
        results["server"] = burst
        print(f"one /predicts of {cfg.burst_files} strips on {cfg.server_root}: answered {burst['status']} in "
              f"{burst['answered_in_s']:.2f} s; /health meanwhile p50 {burst['health_p50_ms']:.1f} ms, "
              f"max {burst['health_max_ms']:.1f} ms")
    return write_results(cfg.output, results)


if __name__ == "__main__":
    main(parse_config())
