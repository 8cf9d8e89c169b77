"""Caption local images: files, or folders (recursively) streamed in batches, printed or written to a JSON, JSON lines
or CSV file that a rerun continues where a stopped run ended.

    python demo.py --checkpoint best.pth --image_paths a.jpg photos/
    python demo.py --checkpoint best.pth --image_paths photos/ --output_path captions.csv --batch_size 16
    python demo.py --checkpoint best.pth --image_paths photos/ --output_path samples.jsonl --method sample \
        --num_captions 3
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image
from tqdm import tqdm

from captioner import SEARCH_METHODS, Caption, Captioner, load_captioner
from data.images import ImageLoadError, open_image
from data.records import IMAGE_SUFFIXES
from deploy.checkpoints import CheckpointError, require_end_to_end
from utils.cli import CheckpointOptions, LengthOptions, parse_dataclass, plain_warnings, resolve_max_len
from utils.fields import option
from utils.plots import save_caption_grid
from utils.runtime import RuntimeOptions

OUTPUT_FORMATS = (".json", ".jsonl", ".csv")
GRID_MAX = 64  # images a --grid sheet shows (the first ones)


@dataclass(frozen=True)
class DemoConfig(CheckpointOptions, LengthOptions, RuntimeOptions):
    """Every demo.py setting (the checkpoint, length and runtime flags are shared with the other scripts)."""

    image_paths: tuple[str, ...] = option((), "image files, or folders of images (their subfolders too)", nargs="+",
                                          required=True, group="data")
    output_path: str = option("", "write the captions to this file instead of the screen, in the format of its "
                              "suffix (.json, .jsonl or .csv), with a progress bar; a rerun continues where a stopped "
                              "run ended (what is done is kept in <output_path>.progress)", aliases=("--output",),
                              group="data")
    overwrite: bool = option(False, "replace --output_path (and its progress record) instead of refusing or "
                             "continuing", group="data")
    method: str = option("beam", "how captions are searched: beam (beam search), greedy, or sample (--num_captions "
                         "drawn at temperature 1, reproducible with --seed)", choices=SEARCH_METHODS,
                         group="evaluation")
    beam_size: int = option(5, "beam width (--method beam)", group="evaluation")
    num_captions: int = option(1, "captions per image (at most --beam_size for beam search, 1 for greedy)",
                               group="evaluation")
    seed: int = option(0, "random seed of --method sample: each batch draws from its own generator, so a rerun "
                       "samples what an uninterrupted run would", group="evaluation")
    batch_size: int = option(8, "images captioned together (the next batch is read while one is captioned)",
                             group="evaluation")
    json: bool = option(False, "print JSON lines instead of text (without --output_path)", group="evaluation")
    grid: str = option("", f"also save the first {GRID_MAX} images with their captions as this PNG",
                       group="evaluation")


def parse_config(argv: list[str] | None = None) -> DemoConfig:
    # the reference demo's model flags are accepted and ignored: the checkpoint describes its own model
    cfg, p = parse_dataclass(DemoConfig, argv, __doc__, ignored=("--model_dim", "--N_enc", "--N_dec"))
    if cfg.beam_size < 1 or cfg.num_captions < 1 or cfg.batch_size < 1:
        p.error("--beam_size, --num_captions and --batch_size must be at least 1")
    if cfg.method == "beam" and cfg.num_captions > cfg.beam_size:
        p.error(f"--num_captions must be at most --beam_size ({cfg.beam_size}) for beam search")
    if cfg.method == "greedy" and cfg.num_captions != 1:
        p.error("--num_captions: greedy search gives one caption per image; use --method beam or sample for more")
    if cfg.seed < 0:
        p.error(f"--seed must be 0 or more, got {cfg.seed}")
    if cfg.output_path and Path(cfg.output_path).suffix.lower() not in OUTPUT_FORMATS:
        p.error(f"--output_path {cfg.output_path}: give a file ending in {', '.join(OUTPUT_FORMATS)} (the format)")
    if cfg.output_path and Path(cfg.output_path).is_dir():
        p.error(f"--output_path {cfg.output_path} is a folder; give a file")
    return cfg


def list_image_files(paths: tuple[str, ...]) -> list[Path]:
    """Files as given, folders walked recursively for image files (by suffix, sorted, hidden ones left out), each path
    once; missing paths are kept, to be reported as unreadable."""
    out: dict[Path, None] = {}
    for raw in paths:
        root = Path(raw)
        if not root.is_dir():
            out[root] = None
            continue
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    out[Path(folder) / name] = None
    return list(out)


class CaptionFile:
    """Rows of one output format: the text a file starts with, the text of one image's captions, the text it ends
    with. JSON is one array (complete once the run ends); JSON lines and CSV are readable at any time."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    def start(self) -> str:
        return {".json": "[", ".csv": _csv_line(["image", "rank", "caption", "score"])}.get(self.suffix, "")

    def rows(self, name: str, captions: list[Caption], first: bool) -> str:
        if self.suffix == ".csv":
            return "".join(_csv_line([name, rank, c.text, f"{c.score:.6f}"]) for rank, c in enumerate(captions, 1))
        entry = json.dumps(image_entry(name, captions), ensure_ascii=False)
        return f"{'' if first else ','}\n  {entry}" if self.suffix == ".json" else entry + "\n"

    def end(self) -> str:
        return "\n]\n" if self.suffix == ".json" else ""


def _csv_line(values: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def image_entry(name: str, captions: list[Caption]) -> dict[str, Any]:
    return {"image": name, "captions": [{"caption": c.text, "score": c.score} for c in captions]}


class ProgressRecord:
    """What a run writing --output_path has done, kept beside it in <output_path>.progress (JSON lines): the
    settings, then one line per batch after its rows are on disk (the output's committed length, the images captioned
    and skipped).
    A rerun truncates the output to its last committed length and continues with the images not yet captioned."""

    def __init__(self, output: Path, settings: dict[str, Any], overwrite: bool) -> None:
        self.output, self.path = output, output.with_name(output.name + ".progress")
        self.settings, self.done, self.captioned_before = settings, set(), 0
        self.format = CaptionFile(output.suffix.lower())
        if overwrite:
            self.output.unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)
        elif self.output.exists() and not self.path.exists():
            raise FileExistsError(f"--output_path {output} exists and is not a run of demo.py (no {self.path.name} "
                                  "beside it); give --overwrite True to replace it, or another --output_path")
        elif self.path.exists() and not self.output.exists():
            print(f"{self.path} describes no file ({output} is gone): starting again", file=sys.stderr)
            self.path.unlink()
        self.committed = self._resume() if self.path.exists() else None

    def _resume(self) -> int:
        """Read the record, check it is this run's, and give the output length its last batch committed."""
        text = self.path.read_text(encoding="utf-8")
        complete = text[:text.rfind("\n") + 1]  # a line cut short by a kill is dropped
        lines = [json.loads(line) for line in complete.splitlines()]
        recorded = lines[0]["settings"] if lines else None
        if recorded != self.settings:
            changed = "; ".join(f"{k}: {(recorded or {}).get(k)!r} then, {self.settings.get(k)!r} now"
                                for k in sorted(set(self.settings) | set(recorded or {}))
                                if (recorded or {}).get(k) != self.settings.get(k))
            raise ValueError(f"--output_path {self.output} was written with other settings ({changed}); give "
                             "--overwrite True to start again, or another --output_path")
        committed = lines[-1]["bytes"]
        if self.output.stat().st_size < committed:
            raise ValueError(f"--output_path {self.output} is shorter than {self.path.name} records ({committed} "
                             "bytes): it was changed; give --overwrite True to start again")
        for line in lines[1:]:
            self.done.update(line["captioned"])
        self.captioned_before = len(self.done)
        with open(self.path, "r+b") as f:
            f.truncate(len(complete.encode("utf-8")))
        return committed

    def open(self) -> tuple[IO[str], IO[str]]:
        """The output and the record, opened to append (the output cut back to its last committed batch)."""
        if self.committed is None:
            with open(self.output, "w", encoding="utf-8", newline="") as out:
                out.write(self.format.start())
            self._append_line({"settings": self.settings}, {"bytes": self.output.stat().st_size})
        else:
            with open(self.output, "r+b") as out:
                out.truncate(self.committed)
        return open(self.output, "a", encoding="utf-8", newline=""), open(self.path, "a", encoding="utf-8")

    def _append_line(self, *parts: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: v for part in parts for k, v in part.items()}) + "\n")

    def commit(self, out: IO[str], record: IO[str], captioned: list[str], skipped: list[str]) -> None:
        """After a batch's rows were written: both files on disk, the record naming what the batch did."""
        _sync(out)
        record.write(json.dumps({"bytes": out.tell(), "captioned": captioned, "skipped": skipped}) + "\n")
        _sync(record)
        self.done.update(captioned)


def _sync(f: IO[str]) -> None:
    f.flush()
    os.fsync(f.fileno())


def run_settings(cfg: DemoConfig) -> dict[str, Any]:
    """What decides an output's captions: a rerun continues a file only with the same settings."""
    sampled = cfg.method == "sample"
    return {"checkpoint": [str(Path(c).resolve()) for c in cfg.checkpoint], "vocab": cfg.vocab,
            "image_paths": list(cfg.image_paths), "method": cfg.method,
            "beam_size": cfg.beam_size if cfg.method == "beam" else None, "num_captions": cfg.num_captions,
            "max_len": cfg.max_len, "max_seq_len": cfg.max_seq_len, "precision": cfg.precision,
            "seed": cfg.seed if sampled else None, "batch_size": cfg.batch_size if sampled else None}


def image_reader(captioner: Captioner) -> Callable[[Path], Any]:
    """path -> what caption() takes: the preprocessed (3, H, W) tensor (decoded and resized in a worker thread, so a
    batch in waiting holds no full-size photos), or the opened image for an ensemble whose members want other sizes;
    an unreadable file gives its error."""
    sizes = set(getattr(captioner.runtime, "preprocessings", None) or [captioner.runtime.preprocessing])

    def read(path: Path) -> Any:
        try:
            if len(sizes) > 1:
                return open_image(path, max_pixels=captioner.max_pixels)
            return captioner.preprocess([path])[0]
        except (ImageLoadError, OSError) as e:
            return ImageLoadError(str(e))

    return read


def read_ahead(batches: list[list[Path]], read: Callable[[Path], Any], workers: int
               ) -> Iterator[tuple[list[Path], list[Any]]]:
    """Each batch's paths with what `read` gave for each, the next batch read while the caller works on this one."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        def submit(batch: list[Path]) -> list[Future]:
            return [pool.submit(read, path) for path in batch]

        pending = submit(batches[0]) if batches else []
        for i, batch in enumerate(batches):
            current = pending
            pending = submit(batches[i + 1]) if i + 1 < len(batches) else []
            yield batch, [f.result() for f in current]


def batch_seed(seed: int, start: int) -> int:
    """The seed of the batch whose first image is number `start` of the listing, under --seed `seed`: a 32-bit mix of
    both (the CPU generator's Mersenne Twister keeps only a seed's low 32 bits, so seed * 2**32 + start gave every
    --seed the same draws), distinct for the (seed, batch) pairs of a run up to a 2**-32 chance."""
    digest = hashlib.blake2b(f"demo.py sample {seed} {start}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def caption_batch(captioner: Captioner, cfg: DemoConfig, items: list[Any], max_len: int, start: int
                  ) -> list[list[Caption]]:
    """The captions of one batch; sampling draws from a generator seeded by --seed and the batch's first index."""
    generator = None
    if cfg.method == "sample":
        generator = torch.Generator(device="cpu" if captioner.backend == "onnx" else captioner.device)
        generator.manual_seed(batch_seed(cfg.seed, start))
    return captioner.caption(items, beam_size=cfg.beam_size, max_len=max_len, num_captions=cfg.num_captions,
                             method=cfg.method, generator=generator, batch_size=len(items))


def thumbnail(path: str) -> Image.Image:
    """A small copy of an image for --grid (the sheet draws 256 px tiles)."""
    image = open_image(path)
    image.thumbnail((256, 256))
    return image


def print_captions(cfg: DemoConfig, name: str, captions: list[Caption]) -> None:
    if cfg.json:
        print(json.dumps(image_entry(name, captions), ensure_ascii=False), flush=True)
        return
    print(f"{name}:")
    for c in captions:
        print(f"  {c.text}  ({c.score:.3f})", flush=True)


def main(cfg: DemoConfig) -> int:
    paths = list_image_files(cfg.image_paths)
    record = ProgressRecord(Path(cfg.output_path), run_settings(cfg), cfg.overwrite) if cfg.output_path else None
    done = record.done if record else set()
    batches = [paths[s:s + cfg.batch_size] for s in range(0, len(paths), cfg.batch_size)]
    batches = [b for b in batches if any(str(p) not in done for p in b)]  # fixed boundaries: a rerun's seeds match
    if record and not batches:
        print(f"all {len(paths)} images are already in {cfg.output_path} (see {record.path.name}; --overwrite True "
              "captions them again)", file=sys.stderr)
        return 0
    t0 = time.perf_counter()
    captioner = load_captioner(list(cfg.checkpoint), device=cfg.device, vocab=cfg.vocab or None,
                               precision=cfg.precision, backend=cfg.backend, onnx_cache=cfg.onnx_cache or None,
                               compile=cfg.compile)
    require_end_to_end(captioner.config, cfg.checkpoint[0])
    max_len = resolve_max_len(cfg, captioner.max_caption_len)
    t_loaded = time.perf_counter()
    first_index = {str(p): i for i, p in enumerate(paths)}
    out, log = record.open() if record else (None, None)
    bar = tqdm(total=len(paths), initial=len(done & first_index.keys()), unit="img", desc="captioning",
               disable=record is None)
    captioned = skipped = 0
    grid: list[tuple[Image.Image, str]] = []
    try:
        for batch, items in read_ahead(batches, image_reader(captioner), cfg.num_workers):
            todo = [(p, it) for p, it in zip(batch, items) if str(p) not in done]
            readable = [(str(p), it) for p, it in todo if not isinstance(it, ImageLoadError)]
            for _, it in todo:
                if isinstance(it, ImageLoadError):
                    bar.write(f"skipped {it}", file=sys.stderr)
            results = caption_batch(captioner, cfg, [it for _, it in readable], max_len,
                                    first_index[str(batch[0])]) if readable else []
            names = [n for n, _ in readable]
            if record:
                out.write("".join(record.format.rows(n, caps, first=captioned + record.captioned_before + i == 0)
                                  for i, (n, caps) in enumerate(zip(names, results))))
                record.commit(out, log, names, [str(p) for p, it in todo if isinstance(it, ImageLoadError)])
            else:
                for name, caps in zip(names, results):
                    print_captions(cfg, name, caps)
            if cfg.grid:
                grid += [(thumbnail(n), caps[0].text) for n, caps in zip(names, results)][:GRID_MAX - len(grid)]
            captioned += len(readable)
            skipped += len(todo) - len(readable)
            bar.update(len(batch))
    finally:
        bar.close()
        if record:
            out.write(record.format.end())  # the record's lengths end before it: a rerun cuts it off again
            out.close()
            log.close()
    seconds = time.perf_counter() - t_loaded
    print(f"captioned {captioned} images in {seconds:.1f} s ({captioned / max(seconds, 1e-9):.2f} images/s; model "
          f"loaded in {t_loaded - t0:.1f} s)" + (f", skipped {skipped} unreadable (named above)" if skipped else "")
          + (f"; wrote {cfg.output_path}" if record else ""), file=sys.stderr)
    if cfg.grid and grid:
        path = save_caption_grid([im for im, _ in grid], [c for _, c in grid], cfg.grid)
        print(f"saved {path}", file=sys.stderr)
    return 1 if skipped else 0


if __name__ == "__main__":
    plain_warnings()
    try:
        sys.exit(main(parse_config()))
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
