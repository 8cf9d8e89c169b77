"""Caption a split (sharded over processes, batch halved on out-of-memory), score it, and describe what was measured."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from data.loaders import CaptionBatch, CaptionDataset, ImageSource, ShardSampler, make_loader
from data.records import ImageRecord
from data.vocab import Vocabulary
from deploy.runtime import CaptionRuntime, TorchRuntime
from eval.caption_stats import caption_stats
from eval.cider import CiderD
from eval.metrics import MeteorSession, python_tokenize, score_captions
from models.decoding import beam_search
from models.expansionnet import ExpansionNet
from utils.dist import all_gather_objects

# Evaluation decodes in fp32 on every device unless asked otherwise: bf16 changes captions (2 of 4 on the CPU
# benchmarks), so its CIDEr-D would not compare with the reference's fp32 numbers. Training precision is its own.
EVAL_PRECISION = "fp32"


def as_runtime(model: ExpansionNet | CaptionRuntime, device: torch.device, precision: str) -> CaptionRuntime:
    """What evaluation decodes with: a runtime as given (ONNX Runtime, ensemble, ...) or a PyTorch model wrapped
    with the run's device and autocast precision."""
    if isinstance(model, CaptionRuntime):
        return model
    return TorchRuntime(model, None, device, precision)


def _decode_batch(model: ExpansionNet | CaptionRuntime, batch: CaptionBatch, vocab: Vocabulary, beam_size: int,
                  max_len: int, device: torch.device, precision: str) -> list[str]:
    runtime = as_runtime(model, device, precision)
    batch = batch.to(device)
    memory = runtime.encode(features=batch.features, images=batch.images)
    out = beam_search(runtime, memory, None, sos_idx=vocab.sos_idx, eos_idx=vocab.eos_idx, pad_idx=vocab.pad_idx,
                      beam_size=beam_size, max_len=max_len, num_outputs=1)
    tokens, lengths = out.tokens[:, 0].cpu().tolist(), out.lengths[:, 0].tolist()
    return [vocab.decode(t[:n]) for t, n in zip(tokens, lengths)]


def _split_batch(batch: CaptionBatch) -> tuple[CaptionBatch, CaptionBatch]:
    h = len(batch) // 2

    def part(sl: slice) -> CaptionBatch:
        return CaptionBatch(batch.image_ids[sl], batch.images[sl] if batch.images is not None else None,
                            batch.features[sl] if batch.features is not None else None, batch.tokens[:0],
                            batch.caption_index[:0], batch.refs[sl])

    return part(slice(0, h)), part(slice(h, None))


def decode_with_backoff(model: ExpansionNet | CaptionRuntime, batch: CaptionBatch, vocab: Vocabulary, beam_size: int,
                        max_len: int, device: torch.device, precision: str) -> list[str]:
    """Decode a batch; on CUDA out-of-memory, halve it and retry (most OOMs happen at evaluation)."""
    try:
        return _decode_batch(model, batch, vocab, beam_size, max_len, device, precision)
    except torch.cuda.OutOfMemoryError:
        if len(batch) == 1:
            raise
        torch.cuda.empty_cache()
        first, second = _split_batch(batch)
        return (decode_with_backoff(model, first, vocab, beam_size, max_len, device, precision)
                + decode_with_backoff(model, second, vocab, beam_size, max_len, device, precision))


@torch.no_grad()
def caption_records(model: ExpansionNet | CaptionRuntime, records: Sequence[ImageRecord], vocab: Vocabulary,
                    source: ImageSource, *, beam_size: int, max_len: int, batch_size: int, device: torch.device,
                    precision: str = EVAL_PRECISION, rank: int = 0, world: int = 1, num_workers: int = 0,
                    progress: bool = True, desc: str = "captioning") -> tuple[dict[int, str], list[str]]:
    """Captions for every record (gathered from all processes) and the names of unreadable images.

    Each process decodes every world-th image; the gathered ids are checked to be exactly the records' ids.
    `model` is a PyTorch ExpansionNet (decoded on `device` under `precision`) or any deploy.runtime runtime: an
    ONNX Runtime export or an ensemble (deploy.loading.load_model gives one from paths). A runtime's vocabulary
    size must be the vocabulary's.
    """
    if isinstance(model, CaptionRuntime) and model.vocab_size != len(vocab):
        raise ValueError(f"the model has {model.vocab_size} outputs but the vocabulary {len(vocab)} tokens")
    is_module = isinstance(model, torch.nn.Module)
    was_training = model.training if is_module else False
    if is_module:
        model.eval()
    dataset = CaptionDataset(records, vocab, source, mode="image")
    loader = make_loader(dataset, ShardSampler(len(dataset), batch_size, rank, world), num_workers=num_workers,
                         pin_memory=device.type == "cuda")
    local: dict[int, str] = {}
    skipped: list[str] = []
    bar = tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress or rank != 0, leave=False)
    for batch in loader:
        skipped.extend(batch.skipped)
        if len(batch):
            local.update(zip(batch.image_ids, decode_with_backoff(model, batch, vocab, beam_size, max_len, device,
                                                                  precision)))
        bar.update(len(batch) + len(batch.skipped))
    bar.close()
    if is_module:
        model.train(was_training)
    merged: dict[int, str] = {}
    all_skipped: list[str] = []
    for part, sk in all_gather_objects((local, skipped)):
        overlap = set(merged) & set(part)
        if overlap:
            raise RuntimeError(f"distributed evaluation decoded {len(overlap)} images twice")
        merged.update(part)
        all_skipped.extend(sk)
    expected = {r.image_id for r in records}
    decoded_or_skipped = len(merged) + len(all_skipped)
    if not set(merged) <= expected or decoded_or_skipped != len(expected):
        raise RuntimeError(f"evaluation covered {len(merged)} images (+{len(all_skipped)} unreadable) but the split "
                           f"has {len(expected)}")
    return merged, all_skipped


def quick_cider(predictions: dict[int, str], records: Sequence[ImageRecord]) -> float:
    """CIDEr-D x100 with a pure-Python tokenizer and document frequencies from these references (training-time
    validation; test.py computes the official PTB-tokenised numbers)."""
    ids = [r.image_id for r in records if r.image_id in predictions]
    if not ids:
        return 0.0
    refs = {r.image_id: [python_tokenize(c) for c in r.captions] for r in records}
    score, _ = CiderD().score([python_tokenize(predictions[i]) for i in ids], [refs[i] for i in ids])
    return 100.0 * float(score)


def evaluation_report(predictions: dict[int, str], records: Sequence[ImageRecord], metrics: Sequence[str],
                      spice_dir: str | None = None, meteor: MeteorSession | None = None) -> dict:
    """COCO metrics (x100, PTB-tokenised when Java works) plus caption statistics, as one JSON-able dict;
    meteor: a METEOR session shared with other reports (eval.metrics.shared_meteor)."""
    gts = {r.image_id: list(r.captions) for r in records if r.image_id in predictions}
    res = {i: predictions[i] for i in gts}
    report = score_captions(gts, res, metrics=metrics, spice_dir=spice_dir, meteor=meteor)
    return {"metrics": {k: 100.0 * v for k, v in report.scores.items()}, "unavailable": report.unavailable,
            "tokenizer": report.tokenizer, "official": report.official, "num_images": len(res),
            "caption_stats": caption_stats(list(res.values()))}


def decoding_record(runtime: CaptionRuntime, *, beam_size: int, max_len: int, split: str, split_size: int
                    ) -> dict[str, Any]:
    """What an evaluation measured, as each of its metrics and predictions files records it: the weights' digest,
    the backend and precision that decoded them, the beam size and length cap, and the split with its image count
    (a PyTorch model: as_runtime(model, device, precision) gives its runtime)."""
    return {"weights_sha256": runtime.weights()["weights_sha256"], "backend": runtime.kind,
            "precision": runtime.precision, "beam_size": beam_size, "max_len": max_len, "split": split,
            "split_size": split_size}


def prediction_rows(predictions: dict[int, str], record: dict[str, Any], file_names: dict[int, str] | None = None
                    ) -> list[dict[str, Any]]:
    """A predictions file's content: COCO results (image_id, caption; pycocotools' loadRes reads them), each row
    also carrying its file name when given and the decoding_record, so the file says how it was made."""
    return [{"image_id": i, "caption": predictions[i], **({"file_name": file_names[i]} if file_names else {}),
             **record} for i in sorted(predictions)]
