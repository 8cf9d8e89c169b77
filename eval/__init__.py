"""Caption evaluation: vectorised CIDEr-D, dependable COCO caption metrics and caption statistics."""

from eval.caption_stats import DANGLING_WORDS, caption_stats
from eval.cider import CiderD
from eval.metrics import MetricReport, find_java, python_tokenize, sanitize_caption, score_captions

__all__ = [
    "DANGLING_WORDS",
    "CiderD",
    "MetricReport",
    "caption_stats",
    "find_java",
    "python_tokenize",
    "sanitize_caption",
    "score_captions",
]
