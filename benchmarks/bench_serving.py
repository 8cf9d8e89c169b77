"""Serving throughput: a real uvicorn server, one client at a time vs 16 concurrent clients (micro-batching), its model
on the CPU or (--device cuda) on a GPU.

With --baseline_root, the same model is also served from another checkout (e.g. the commit before a change) and the
two servers are measured in alternation, round after round, so that both see the same machine load."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import ROOT, environment, write_results  # puts the repository root on sys.path

if TYPE_CHECKING:
    from serving.testing import RunningServer


@dataclass(frozen=True)
class BenchConfig:
    requests: int
    concurrency: int
    img_size: int
    beam_size: int
    max_len: int
    max_batch_size: int
    max_wait_ms: float
    threads: int
    rounds: int
    baseline_root: str | None
    output: str | None
    device: str = "cpu"
    precision: str = "auto"


def parse_config(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=96, help="requests per phase (same total for both phases)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients in the second phase")
    p.add_argument("--img_size", type=int, default=64, help="input size of the benchmark model")
    p.add_argument("--beam_size", type=int, default=3, help="beam width of every request")
    p.add_argument("--max_len", type=int, default=20, help="maximum caption length of every request")
    p.add_argument("--max_batch_size", type=int, default=16, help="CAPTION_MAX_BATCH_SIZE of the server")
    p.add_argument("--max_wait_ms", type=float, default=5.0, help="CAPTION_MAX_WAIT_MS of the server")
    p.add_argument("--threads", type=int, default=0, help="CAPTION_THREADS (torch threads; 0: torch's default)")
    p.add_argument("--rounds", type=int, default=1, help="repeat both phases; medians are reported")
    p.add_argument("--baseline_root", default=None,
                   help="also serve api.py from this checkout and measure it in alternation with this one")
    p.add_argument("--output", "--json", dest="output", default=None,
                   help="also write the results (with device and versions) as JSON to this file")
    p.add_argument("--device", default="cpu", help="CAPTION_DEVICE of the server (cpu, cuda)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="CAPTION_PRECISION of the server (auto: fp32 on the CPU, bf16 on a GPU)")
    a = p.parse_args(argv)
    return BenchConfig(a.requests, a.concurrency, a.img_size, a.beam_size, a.max_len, a.max_batch_size,
                       a.max_wait_ms, a.threads, a.rounds, a.baseline_root, a.output, a.device, a.precision)


def make_checkpoint(directory: Path, img_size: int) -> Path:
    """A small but not trivial end-to-end model (SwinV2 3 stages, d_model 128, 2+2 layers, 500 words), random."""
    import torch

    from data.vocab import build_vocabulary
    from deploy.checkpoints import save_model_checkpoint
    from models import ModelConfig, build_model, tiny_swinv2

    vocab = build_vocabulary([" ".join(f"word{i}" for i in range(500))], min_count=1)
    cfg = ModelConfig(name="optimizer_expansionnet", vocab_size=len(vocab), max_seq_len=32, d_model=128, N_enc=2,
                      N_dec=2, num_heads=4, ff=512, num_exp_enc_list=(16, 32), num_exp_dec=16, img_feature_dim=128,
                      memory_slots=8, mult_residual=True,
                      backbone=tiny_swinv2(img_size=img_size, embed_dim=32, depths=(2, 2, 2), window_size=4))
    torch.manual_seed(0)
    return save_model_checkpoint(directory / "bench.pth", build_model(cfg), cfg, vocab)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def run_phase(base_url: str, image: bytes, query: str, total: int, concurrency: int) -> dict[str, float]:
    """``total`` POST /predict requests from ``concurrency`` clients; requests/s and latency percentiles (ms)."""
    import httpx

    latencies: list[float] = []
    remaining = list(range(total))

    async def client_loop(client: httpx.AsyncClient) -> None:
        while remaining:
            remaining.pop()
            start = time.perf_counter()
            answer = await client.post(f"/predict?{query}", files={"file": ("bench.jpg", image, "image/jpeg")})
            latencies.append(time.perf_counter() - start)
            answer.raise_for_status()

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=300.0, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = [1000 * latency for latency in latencies]
    return {"requests": total, "clients": concurrency, "seconds": elapsed, "requests_per_s": total / elapsed,
            "p50_ms": statistics.median(ms), "p95_ms": percentile(ms, 95)}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(server: RunningServer, image: bytes, query: str, cfg: BenchConfig) -> dict[str, dict[str, float]]:
    """One round: the requests one at a time, then from cfg.concurrency clients; with each phase, the server's CPU
    time per request (a figure other jobs on a shared machine disturb much less than requests/s)."""
    round_: dict[str, dict[str, float]] = {}
    for phase, clients in (("sequential", 1), ("concurrent", cfg.concurrency)):
        cpu = process_cpu_seconds(server.process.pid)
        round_[phase] = asyncio.run(run_phase(server.base_url, image, query, cfg.requests, clients))
        cpu = process_cpu_seconds(server.process.pid) - cpu
        round_[phase]["server_cpu_ms_per_request"] = 1000 * cpu / cfg.requests
    return round_


def summarise(rounds: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Medians over rounds of each phase's figures, and of the concurrent / sequential ratio."""
    summary: dict[str, Any] = {phase: {key: statistics.median(r[phase][key] for r in rounds)
                                          for key in rounds[0][phase]} for phase in ("sequential", "concurrent")}
    summary["throughput_ratio"] = statistics.median(r["concurrent"]["requests_per_s"] /
                                                    r["sequential"]["requests_per_s"] for r in rounds)
    return summary


def serve_and_measure(cfg: BenchConfig) -> dict[str, list[dict[str, dict[str, float]]]]:
    """Rounds of measurements per server (this checkout, and the baseline one when given), in alternation."""
    from serving.testing import image_bytes, uvicorn_server

    image = image_bytes((640, 480), "JPEG")
    query = f"beam_size={cfg.beam_size}&max_len={cfg.max_len}"
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        checkpoint = make_checkpoint(Path(tmp), cfg.img_size)
        env = {"CAPTION_CHECKPOINT": str(checkpoint), "CAPTION_MAX_BATCH_SIZE": str(cfg.max_batch_size),
               "CAPTION_MAX_WAIT_MS": str(cfg.max_wait_ms), "CAPTION_QUEUE_SIZE": str(4 * cfg.concurrency),
               "CAPTION_THREADS": str(cfg.threads), "CAPTION_DEVICE": cfg.device, "CAPTION_PRECISION": cfg.precision}
        roots = {"this checkout": ROOT}
        if cfg.baseline_root:
            roots["baseline"] = Path(cfg.baseline_root).resolve()
        servers = {name: stack.enter_context(uvicorn_server("api:app", env, Path(tmp) / f"server{i}.log",
                                                            app_dir=root))
                   for i, (name, root) in enumerate(roots.items())}
        for server in servers.values():  # warm-up
            asyncio.run(run_phase(server.base_url, image, query, 2 * cfg.concurrency, cfg.concurrency))
        rounds: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in servers}
        for index in range(cfg.rounds):
            for name in list(servers)[::1 if index % 2 == 0 else -1]:
                rounds[name].append(measure(servers[name], image, query, cfg))
    return rounds


def main(cfg: BenchConfig) -> dict[str, object]:
    rounds = serve_and_measure(cfg)
    results: dict[str, object] = {"config": vars(cfg), "environment": environment(cfg.device), "rounds": rounds}
    print(f"model: {cfg.img_size} px end-to-end Optimizer-ExpansionNet (random weights), beam {cfg.beam_size}, "
          f"max_len {cfg.max_len}, server max batch {cfg.max_batch_size}, max wait {cfg.max_wait_ms:g} ms; "
          f"medians of {cfg.rounds} round(s)" + (f"; server on {cfg.device}, precision {cfg.precision}"
                                                  if cfg.device != "cpu" or cfg.precision != "auto" else ""))
    for server, measured in rounds.items():
        summary = summarise(measured)
        results[server] = summary
        print(f"{server}:")
        for label, key in (("one at a time", "sequential"), (f"{cfg.concurrency} concurrent", "concurrent")):
            phase = summary[key]
            print(f"{label:>15}: {phase['requests_per_s']:7.2f} requests/s  p50 {phase['p50_ms']:7.1f} ms  "
                  f"p95 {phase['p95_ms']:7.1f} ms  server CPU {phase['server_cpu_ms_per_request']:5.1f} ms/request  "
                  f"({phase['requests']:.0f} requests in {phase['seconds']:.1f} s)")
        print(f"throughput ratio (concurrent / sequential): {summary['throughput_ratio']:.2f}x (target >= 2x)")
    if "baseline" in rounds:
        paired = [ours["concurrent"]["requests_per_s"] / base["concurrent"]["requests_per_s"]
                  for ours, base in zip(rounds["this checkout"], rounds["baseline"])]
        results["concurrent_vs_baseline"] = statistics.median(paired)
        print(f"{cfg.concurrency}-client throughput, this checkout / baseline, median of paired rounds: "
              f"{statistics.median(paired):.2f}x (rounds: {', '.join(f'{p:.2f}' for p in paired)})")
        cpu = [ours["concurrent"]["server_cpu_ms_per_request"] / base["concurrent"]["server_cpu_ms_per_request"]
               for ours, base in zip(rounds["this checkout"], rounds["baseline"])]
        results["concurrent_cpu_vs_baseline"] = statistics.median(cpu)
        print(f"server CPU per request at {cfg.concurrency} clients, this checkout / baseline, median of paired "
              f"rounds: {statistics.median(cpu):.2f}x (rounds: {', '.join(f'{c:.2f}' for c in cpu)})")
    return write_results(cfg.output, results)


if __name__ == "__main__":
    main(parse_config())
