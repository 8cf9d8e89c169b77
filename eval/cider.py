"""Vectorised CIDEr-D (numpy) with exactly the semantics of pycocoevalcap's Cider/CiderScorer."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["CiderD", "best_constant_caption"]


def _split(sentences: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Whitespace-split sentences (like ``str.split()`` in pycocoevalcap); returns (flat words (T,), lengths (S,))."""
    split = [s.split() for s in sentences]
    lengths = np.fromiter(map(len, split), dtype=np.int64, count=len(split))
    return list(itertools.chain.from_iterable(split)), lengths


def _local_word_ids(words: list[str]) -> np.ndarray:
    """Id of each word = index of its first occurrence (unique per word, bounded by T): (T,) int64."""
    first: dict[str, int] = {}
    return np.fromiter(map(first.setdefault, words, itertools.count()), dtype=np.int64, count=len(words))


def _remaining(lengths: np.ndarray) -> np.ndarray:
    """Number of tokens from each position to the end of its sentence, itself included: (T,) int64."""
    ends = np.cumsum(lengths)
    return np.repeat(ends, lengths) - np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64)


def _bits(count: int) -> int:
    """Bits needed to store the values 0..count-1."""
    return max(1, int(count - 1).bit_length())


@dataclass(frozen=True)
class _CorpusDF:
    """Document frequencies of a fixed reference corpus, stored per n-gram order as sorted integer keys.

    Order-1 n-grams are words (ids from ``vocab``); an order-k n-gram is the key ``id_{k-1} * V + word`` of its
    (k-1)-prefix id and last word, and its id is the position of that key in ``keys[k - 1]`` (sorted, unique).
    """

    vocab: dict[str, int]
    keys: list[np.ndarray]  # keys[k-1]: (U_k,) sorted keys of the order-k n-grams (keys[0] unused)
    df: list[np.ndarray]  # df[k-1]: (U_k,) number of corpus images whose references contain the n-gram
    log_num_images: float

    @classmethod
    def build(cls, df_refs: Sequence[Sequence[str]], n: int) -> _CorpusDF:
        """Intern every n-gram of the corpus and count, per n-gram, the images whose references contain it."""
        if len(df_refs) == 0:
            raise ValueError("df_refs is empty: document frequencies need at least one image")
        refs_per_image = np.fromiter(map(len, df_refs), dtype=np.int64, count=len(df_refs))
        words, lengths = _split([s for refs in df_refs for s in refs])
        vocab: dict[str, int] = {}
        ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), dtype=np.int64, count=len(words))
        width = max(len(vocab), 1)
        image_of_pos = np.repeat(np.repeat(np.arange(len(df_refs), dtype=np.int64), refs_per_image), lengths)
        rem = _remaining(lengths) if len(words) else np.zeros(0, dtype=np.int64)
        keys: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]  # order 1 needs no table: word id = n-gram id
        dfs: list[np.ndarray] = []
        current = ids
        for k in range(1, n + 1):
            if k == 1:
                pos, level_ids, count = np.arange(len(ids)), ids, width
            else:
                pos = np.flatnonzero(rem >= k)
                uniq, level_ids = np.unique(current[pos] * width + ids[pos + k - 1], return_inverse=True)
                count = max(len(uniq), 1)
                keys.append(uniq)
                current = np.empty_like(ids)
                current[pos] = level_ids
            pair = np.sort(image_of_pos[pos] * count + level_ids)
            first = np.ones(len(pair), dtype=bool)
            first[1:] = pair[1:] != pair[:-1]
            dfs.append(np.bincount(pair[first] % count, minlength=count).astype(np.float64))
        return cls(vocab=vocab, keys=keys, df=dfs, log_num_images=float(np.log(float(len(df_refs)))))

    def lookup(self, words: list[str], positions: list[np.ndarray]) -> list[np.ndarray]:
        """Corpus document frequency of the order-k n-gram starting at each of ``positions[k-1]`` (0 if unseen)."""
        width = max(len(self.vocab), 1)
        word_ids = np.fromiter(map(self.vocab.get, words, itertools.repeat(-1)), dtype=np.int64, count=len(words))
        out: list[np.ndarray] = []
        current = word_ids
        for k, pos in enumerate(positions, start=1):
            if k == 1:
                found_ids = word_ids
            else:
                prev, last = current[pos], word_ids[pos + k - 1]
                known = (prev >= 0) & (last >= 0)
                key = np.where(known, prev * width + last, -1)
                table = self.keys[k - 1]
                order = np.argsort(key)  # sorted queries keep the binary searches cache-friendly (3x faster)
                idx = np.empty_like(key)
                idx[order] = np.searchsorted(table, key[order])
                idx = np.minimum(idx, max(len(table) - 1, 0))
                hit = known & (table[idx] == key) if len(table) else np.zeros(len(pos), dtype=bool)
                found_ids = np.where(hit, idx, -1)
                current = np.full_like(word_ids, -1)
                current[pos] = found_ids
            df = self.df[k - 1]
            out.append(np.where(found_ids >= 0, df[np.maximum(found_ids, 0)] if len(df) else 0.0, 0.0))
        return out


class CiderD:
    """CIDEr-D: n-gram (1..n) tf-idf cosine, clipped, with a Gaussian length penalty, averaged over refs, x10.

    Scores equal pycocoevalcap's ``Cider().compute_score`` per image (good models score about 1.3; tables x100).
    With ``df_refs`` the document frequencies and log(N) come once from that corpus (the SCST reward: the training
    references); without it they come from the references of each ``score`` call (the reported metric).
    Only n = 4 has a pycocoevalcap counterpart (its precook always builds 1..4-grams); other n use true 1..n-grams.
    """

    def __init__(self, df_refs: Sequence[Sequence[str]] | None = None, n: int = 4, sigma: float = 6.0) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = int(n)
        self.sigma = float(sigma)
        self._corpus = None if df_refs is None else _CorpusDF.build(df_refs, self.n)

    def score(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[float, np.ndarray]:
        """Score hyps[i] (one space-tokenised caption, may be "") against refs[i].

        Returns (mean over images, per-image scores of shape (len(hyps),)).
        """
        if len(hyps) != len(refs):
            raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference lists")
        if len(hyps) == 0:
            raise ValueError("nothing to score: no hypotheses")
        layout = _Layout.build(hyps, refs)
        grams = _Ngrams.intern(layout.sentences, self.n)
        entries = _Entries.count(layout, grams, self.n)
        df_gid, log_num_images = self._document_frequencies(layout, grams, entries)
        vec, norm = _tfidf(entries, df_gid, log_num_images, len(layout.sentences), self.n)
        dot = _clipped_dot_products(layout, entries, vec, self.n)
        scores_layout = _penalised_cosine_mean(layout, dot, norm, grams.lengths, self.n, self.sigma)
        scores = np.empty(len(hyps), dtype=np.float64)
        scores[layout.hyp_order] = scores_layout
        return float(np.mean(scores)), scores

    def _document_frequencies(self, layout: _Layout, grams: _Ngrams, entries: _Entries) -> tuple[np.ndarray, float]:
        """Document frequency per global n-gram id (num_gids,) and log(N): from df_refs, else from these refs."""
        n = self.n
        if self._corpus is None:
            first_ref = entries.new_pair & entries.is_ref  # refs sort before hyps: a run's first entry is a ref if any
            weights = layout.hyps_per_group[entries.grp[first_ref]].astype(np.float64)  # images sharing the refs
            df_gid = np.bincount(entries.gid[first_ref], weights=weights, minlength=grams.num_gids)
            return df_gid, float(np.log(float(len(layout.hyp_order))))
        df_gid = np.zeros(grams.num_gids, dtype=np.float64)
        for k, (ids, df) in enumerate(zip(grams.level_ids, self._corpus.lookup(grams.words, grams.positions))):
            df_gid[ids * n + k] = df
        return df_gid, self._corpus.log_num_images


@dataclass(frozen=True)
class _Layout:
    """Sentences laid out group by group, so that the refs shared by several images are cooked once.

    A group is the images that share one reference list (the SCST samples of one image); its sentences are its refs
    (r = 0..m-1), then its hyps (r = m..m+h-1). Hyps are numbered in layout order; the pair (hyp i, ref j of its
    group) has index ``pair_base[i] + j``.
    """

    sentences: list[str]  # (S,)
    hyp_order: np.ndarray  # (H,) index into hyps of each hyp in layout order
    hyp_group: np.ndarray  # (H,) group of each hyp in layout order
    refs_per_group: np.ndarray  # (G,)
    hyps_per_group: np.ndarray  # (G,)
    sents_per_group: np.ndarray  # (G,) refs + hyps
    group_first_sent: np.ndarray  # (G,) layout index of the group's first sentence
    group_of_sent: np.ndarray  # (S,)
    r_of_sent: np.ndarray  # (S,) index of the sentence inside its group
    hyp_first: np.ndarray  # (G,) layout number of the group's first hyp
    refs_of_hyp: np.ndarray  # (H,) refs of each hyp's group
    pair_base: np.ndarray  # (H,) index of each hyp's first (hyp, ref) pair
    num_pairs: int  # P

    @classmethod
    def build(cls, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> _Layout:
        """Group the images by reference list and lay their sentences out group after group."""
        group_of_hyp, group_refs = _group_by_references(refs)
        num_groups = len(group_refs)
        hyp_order = np.argsort(group_of_hyp, kind="stable")  # hyps in group order
        hyps_per_group = np.bincount(group_of_hyp, minlength=num_groups)
        refs_per_group = np.fromiter(map(len, group_refs), dtype=np.int64, count=num_groups)
        sentences: list[str] = []
        hyp_iter = iter(hyp_order.tolist())
        for g, grefs in enumerate(group_refs):
            sentences.extend(grefs)
            sentences.extend(hyps[next(hyp_iter)] for _ in range(int(hyps_per_group[g])))
        sents_per_group = refs_per_group + hyps_per_group
        group_first_sent = np.cumsum(sents_per_group) - sents_per_group
        group_of_sent = np.repeat(np.arange(num_groups, dtype=np.int64), sents_per_group)
        r_of_sent = np.arange(len(sentences), dtype=np.int64) - group_first_sent[group_of_sent]
        hyp_group = group_of_hyp[hyp_order]
        refs_of_hyp = refs_per_group[hyp_group]
        return cls(
            sentences=sentences, hyp_order=hyp_order, hyp_group=hyp_group, refs_per_group=refs_per_group,
            hyps_per_group=hyps_per_group, sents_per_group=sents_per_group, group_first_sent=group_first_sent,
            group_of_sent=group_of_sent, r_of_sent=r_of_sent, hyp_first=np.cumsum(hyps_per_group) - hyps_per_group,
            refs_of_hyp=refs_of_hyp, pair_base=np.cumsum(refs_of_hyp) - refs_of_hyp, num_pairs=int(refs_of_hyp.sum()),
        )


def _group_by_references(refs: Sequence[Sequence[str]]) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Group of each image (images with identical reference lists share one): ((I,) int64, refs of each group)."""
    group_of_key: dict[tuple[str, ...], int] = {}
    group_of_hyp = np.fromiter(
        (group_of_key.setdefault(tuple(r), len(group_of_key)) for r in refs), dtype=np.int64, count=len(refs)
    )
    group_refs = list(group_of_key)
    if any(len(r) == 0 for r in group_refs):
        raise ValueError("every image needs at least one reference")
    return group_of_hyp, group_refs


@dataclass(frozen=True)
class _Ngrams:
    """Every n-gram occurrence (orders 1..n) of a list of sentences, interned per order.

    An order-k id is the compact id of (order-(k-1) id of the prefix, last word); the global id of an occurrence is
    its local id * n + (order - 1), so the order is ``gid % n``.
    """

    words: list[str]  # (T,) the tokens, sentence after sentence
    lengths: np.ndarray  # (S,) tokens per sentence
    positions: list[np.ndarray]  # positions[k-1]: (P_k,) start token of each order-k occurrence
    level_ids: list[np.ndarray]  # level_ids[k-1]: (P_k,) local order-k id of each occurrence
    num_gids: int  # bound on the global ids: max(T, 1) * n
    gid: np.ndarray  # (O,) global id of each occurrence, all orders concatenated
    sent: np.ndarray  # (O,) sentence of each occurrence

    @classmethod
    def intern(cls, sentences: list[str], n: int) -> _Ngrams:
        """Split the sentences and give every order-k n-gram occurrence its local and global id."""
        words, lengths = _split(sentences)
        num_tokens = len(words)
        word_ids = _local_word_ids(words)
        rem = _remaining(lengths) if num_tokens else np.zeros(0, dtype=np.int64)
        sent_of_pos = np.repeat(np.arange(len(sentences), dtype=np.int64), lengths)
        positions: list[np.ndarray] = []
        level_ids: list[np.ndarray] = []
        current = word_ids
        max_count = max(num_tokens, 1)
        for k in range(1, n + 1):
            if k == 1:
                pos, ids = np.arange(num_tokens, dtype=np.int64), word_ids
            else:
                pos = np.flatnonzero(rem >= k)
                _, ids = np.unique(current[pos] * max_count + word_ids[pos + k - 1], return_inverse=True)
                ids = ids.astype(np.int64, copy=False)
                current = np.empty_like(word_ids)
                current[pos] = ids
            positions.append(pos)
            level_ids.append(ids)
        gid = np.concatenate([ids * n + k for k, ids in enumerate(level_ids)])
        sent = np.concatenate([sent_of_pos[pos] for pos in positions])
        return cls(words, lengths, positions, level_ids, max_count * n, gid, sent)


@dataclass(frozen=True)
class _Entries:
    """Distinct (group, n-gram, sentence-in-group) triples, sorted in that order, with their term frequencies.

    A run is the entries of one (group, n-gram); within a run the refs (small r) come before the hyps. All (E,).
    """

    grp: np.ndarray
    gid: np.ndarray
    r: np.ndarray
    tf: np.ndarray
    new_pair: np.ndarray  # True at the first entry of each run
    sent: np.ndarray  # layout index of the sentence
    order: np.ndarray  # n-gram order - 1
    is_ref: np.ndarray

    @classmethod
    def count(cls, layout: _Layout, grams: _Ngrams, n: int) -> _Entries:
        """Sort the occurrences by (group, n-gram, sentence-in-group) and count them: term frequencies per sentence."""
        grp, gid, r, tf, new_pair = _count_triples(
            layout.group_of_sent[grams.sent], grams.gid, layout.r_of_sent[grams.sent],
            len(layout.refs_per_group), grams.num_gids, int(layout.sents_per_group.max()),
        )
        sent = layout.group_first_sent[grp] + r
        return cls(grp, gid, r, tf, new_pair, sent, gid % n, r < layout.refs_per_group[grp])


def _tfidf(
    entries: _Entries, df_gid: np.ndarray, log_num_images: float, num_sents: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tf-idf weight of every entry (E,) and the norm of every sentence's vector per order (S, n)."""
    vec = entries.tf.astype(np.float64) * (log_num_images - np.log(np.maximum(df_gid[entries.gid], 1.0)))
    norm = np.bincount(entries.sent * n + entries.order, weights=vec * vec, minlength=num_sents * n)
    return vec, np.sqrt(norm).reshape(-1, n)  # (S * n,) -> (S, n)


def _run_matches(entries: _Entries) -> tuple[np.ndarray, np.ndarray]:
    """Every (hyp entry, ref entry) pair inside one run, as entry indices: ((M,), (M,)), hyp-major."""
    run = np.cumsum(entries.new_pair) - 1
    run_start = np.flatnonzero(entries.new_pair)
    refs_in_run = np.bincount(run[entries.is_ref], minlength=len(run_start))
    hyp_entries = np.flatnonzero(~entries.is_ref)
    pair_count = refs_in_run[run[hyp_entries]]
    hyp_rep = np.repeat(hyp_entries, pair_count)
    offsets = np.cumsum(pair_count) - pair_count
    ref_rep = np.arange(len(hyp_rep), dtype=np.int64) + np.repeat(run_start[run[hyp_entries]] - offsets, pair_count)
    return hyp_rep, ref_rep


def _clipped_dot_products(layout: _Layout, entries: _Entries, vec: np.ndarray, n: int) -> np.ndarray:
    """Clipped dot product sum_g min(v_hyp, v_ref) v_ref of every (hyp, ref) pair, per order: (P, n)."""
    hyp_rep, ref_rep = _run_matches(entries)
    v_hyp, v_ref = vec[hyp_rep], vec[ref_rep]
    contrib = np.minimum(v_hyp, v_ref) * v_ref
    grp_h = entries.grp[hyp_rep]
    hyp_num = layout.hyp_first[grp_h] + entries.r[hyp_rep] - layout.refs_per_group[grp_h]
    pair_id = layout.pair_base[hyp_num] + entries.r[ref_rep]
    dot = np.bincount(pair_id * n + entries.order[hyp_rep], weights=contrib, minlength=layout.num_pairs * n)
    return dot.astype(np.float64, copy=False).reshape(-1, n)  # (P * n,) -> (P, n); bincount of nothing is int64


def _pair_sentences(layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """Layout index of the hyp and of the ref sentence of every (hyp, ref) pair: ((P,), (P,))."""
    num_hyps = len(layout.hyp_order)
    group_first = layout.group_first_sent[layout.hyp_group]  # (H,)
    hyp_sent = group_first + layout.refs_of_hyp + (np.arange(num_hyps) - layout.hyp_first[layout.hyp_group])
    pair_hyp = np.repeat(np.arange(num_hyps, dtype=np.int64), layout.refs_of_hyp)
    ref_sent = group_first[pair_hyp] + (np.arange(layout.num_pairs, dtype=np.int64) - layout.pair_base[pair_hyp])
    return hyp_sent[pair_hyp], ref_sent


def _penalised_cosine_mean(
    layout: _Layout, dot: np.ndarray, norm: np.ndarray, lengths: np.ndarray, n: int, sigma: float
) -> np.ndarray:
    """CIDEr-D of every hyp in layout order (H,): length-penalised cosines averaged over orders and refs, x10."""
    hyp_sent, ref_sent = _pair_sentences(layout)
    bigrams = np.maximum(lengths - 1, 0) if n >= 2 else np.zeros_like(lengths)
    delta = (bigrams[hyp_sent] - bigrams[ref_sent]).astype(np.float64)
    denom = norm[hyp_sent] * norm[ref_sent]  # (P, n)
    cos = np.divide(dot, denom, out=dot.copy(), where=denom != 0)
    cos *= np.exp(-(delta**2) / (2 * sigma**2))[:, None]  # "length" = bigram count: pycocoevalcap's quirk
    num_hyps = len(layout.refs_of_hyp)
    per_hyp = np.add.reduceat(cos, layout.pair_base, axis=0) if layout.num_pairs else np.zeros((num_hyps, n))  # (H, n)
    return per_hyp.mean(axis=1) / layout.refs_of_hyp * 10.0


def _count_triples(
    group: np.ndarray, gid: np.ndarray, r: np.ndarray, num_groups: int, num_gids: int, max_r: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sort occurrences by (group, gid, r) and merge duplicates.

    Returns the distinct (group, gid, r) triples, their counts and a flag marking the first triple of each
    (group, gid) run, all of shape (E,). Packs the triple into one int64 key when it fits, else uses lexsort.
    """
    r_bits, g_bits = _bits(max_r), _bits(num_gids)
    if r_bits + g_bits + _bits(num_groups) <= 62:
        key = np.sort((group << (g_bits + r_bits)) | (gid << r_bits) | r)
        new = np.ones(len(key), dtype=bool)
        new[1:] = key[1:] != key[:-1]
        starts = np.flatnonzero(new)
        ukey = key[starts]
        pair = ukey >> r_bits
        grp_u, gid_u, r_u = pair >> g_bits, pair & ((1 << g_bits) - 1), ukey & ((1 << r_bits) - 1)
        new_pair = np.ones(len(ukey), dtype=bool)
        new_pair[1:] = pair[1:] != pair[:-1]
    else:  # pragma: no cover - needs more than 2**62 distinct keys
        order = np.lexsort((r, gid, group))
        group, gid, r = group[order], gid[order], r[order]
        new = np.ones(len(r), dtype=bool)
        new[1:] = (group[1:] != group[:-1]) | (gid[1:] != gid[:-1]) | (r[1:] != r[:-1])
        starts = np.flatnonzero(new)
        grp_u, gid_u, r_u = group[starts], gid[starts], r[starts]
        new_pair = np.ones(len(starts), dtype=bool)
        new_pair[1:] = (grp_u[1:] != grp_u[:-1]) | (gid_u[1:] != gid_u[:-1])
    counts = np.diff(np.append(starts, len(new)))
    return grp_u, gid_u, r_u, counts, new_pair


def _ngram_counts(sentence: str, n: int) -> dict[tuple[str, ...], int]:
    """Count of every 1..n-gram of a whitespace-split sentence (pycocoevalcap's precook)."""
    words = sentence.split()
    out: dict[tuple[str, ...], int] = {}
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            g = tuple(words[i:i + k])
            out[g] = out.get(g, 0) + 1
    return out


def _bigram_lengths(counts: Sequence[dict[tuple[str, ...], int]]) -> torch.Tensor:
    """CIDEr-D's "length" of each sentence, its bigram count (pycocoevalcap's quirk): (len(counts),) float64."""
    return torch.tensor([sum(tf for g, tf in c.items() if len(g) == 2) for c in counts], dtype=torch.float64)


@dataclass(frozen=True)
class _ConstantCaptionRefs:
    """The references of best_constant_caption, prepared once for scoring every candidate against all of them.

    ``mats[order, k]`` is the dense (G_order, R) matrix [tf_r >= k] tf_r idf^2 over the n-grams of that order, and
    ``local`` maps a global n-gram id to its row there (-1 for other orders).
    """

    gram_id: dict[tuple[str, ...], int]  # every reference n-gram -> global id
    idf: np.ndarray  # (G,)
    log_n: float  # log(number of images): the idf of an n-gram no reference has
    num_images: int  # I
    image_of: torch.Tensor  # (R,) image of each flat reference
    refs_per_image: torch.Tensor  # (I,) float64
    norm: torch.Tensor  # (R, n) tf-idf norm per order
    length: torch.Tensor  # (R,) bigram count
    max_tf: int
    mats: dict[tuple[int, int], tuple[torch.Tensor, np.ndarray]]  # (order, k) -> (matrix, local)

    @classmethod
    def build(cls, refs: Sequence[Sequence[str]], n: int) -> _ConstantCaptionRefs:
        """Idf from the references' document frequencies, then their norms, lengths and clipping matrices."""
        flat = [r for rs in refs for r in rs]
        image_of = torch.tensor([i for i, rs in enumerate(refs) for _ in rs])
        gram_id, idf, log_n = _reference_idf(refs, n)
        order = np.array([len(g) for g in gram_id])
        ref_counts = [_ngram_counts(r, n) for r in flat]
        r_rows, r_cols, r_tf = _sparse_term_frequencies(ref_counts, gram_id)
        r_norm = np.zeros((len(flat), n))
        np.add.at(r_norm, (r_rows, order[r_cols] - 1), (r_tf * idf[r_cols]) ** 2)  # squared weights per (ref, order)
        max_tf = int(r_tf.max())
        return cls(
            gram_id=gram_id, idf=idf, log_n=log_n, num_images=len(refs), image_of=image_of,
            refs_per_image=torch.bincount(image_of).double(), norm=torch.from_numpy(np.sqrt(r_norm)),
            length=_bigram_lengths(ref_counts), max_tf=max_tf,
            mats=_clipping_matrices(order, r_rows, r_cols, r_tf, idf, len(flat), n, max_tf),
        )


def _reference_idf(refs: Sequence[Sequence[str]], n: int) -> tuple[dict[tuple[str, ...], int], np.ndarray, float]:
    """Id and idf log(N) - log(df) of every reference n-gram, df counting images: ({n-gram: id}, (G,), log N)."""
    log_n = np.log(float(len(refs)))
    df: dict[tuple[str, ...], int] = {}
    for rs in refs:
        for g in {g for r in rs for g in _ngram_counts(r, n)}:
            df[g] = df.get(g, 0) + 1
    gram_id = {g: j for j, g in enumerate(df)}
    idf = np.array([log_n - np.log(max(1.0, float(df[g]))) for g in gram_id])
    return gram_id, idf, log_n


def _sparse_term_frequencies(
    counts: Sequence[dict[tuple[str, ...], int]], gram_id: dict[tuple[str, ...], int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The n-gram counts of the references as COO triplets (reference, n-gram id, tf), each (E,)."""
    rows, cols, tfs = [], [], []
    for j, cnt in enumerate(counts):
        for g, tf in cnt.items():
            rows.append(j)
            cols.append(gram_id[g])
            tfs.append(tf)
    return np.array(rows), np.array(cols), np.array(tfs, dtype=np.float64)


def _clipping_matrices(
    order: np.ndarray, rows: np.ndarray, cols: np.ndarray, tf: np.ndarray, idf: np.ndarray, num_refs: int, n: int,
    max_tf: int,
) -> dict[tuple[int, int], tuple[torch.Tensor, np.ndarray]]:
    """Per (order, k) the dense (G_order, R) matrix [tf_r >= k] tf_r idf^2 and the order's global-id-to-row map."""
    mats = {}
    for k_order in range(1, n + 1):
        order_cols = np.nonzero(order == k_order)[0]
        local = np.full(len(order), -1)
        local[order_cols] = np.arange(len(order_cols))
        sel = order[cols] == k_order
        for k in range(1, max_tf + 1):
            keep = sel & (tf >= k)
            mat = torch.zeros(len(order_cols), num_refs, dtype=torch.float64)
            mat[local[cols[keep]], rows[keep]] = torch.from_numpy(tf[keep] * idf[cols[keep]] ** 2)
            mats[k_order, k] = (mat, local)
    return mats


def _candidate_side(
    part: Sequence[str], ref: _ConstantCaptionRefs, n: int
) -> tuple[torch.Tensor, torch.Tensor, dict[tuple[int, int], tuple[list[int], list[int]]]]:
    """Candidates' norms (C, n) and lengths (C,), and per (order, k) the (candidate, n-gram id) cells with tf >= k."""
    counts = [_ngram_counts(c, n) for c in part]
    squares = [[0.0] * n for _ in part]  # plain lists: item-wise adds to a tensor were half of the whole search
    entries: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    for ci, cnt in enumerate(counts):
        for g, tf in cnt.items():
            j = ref.gram_id.get(g)
            w = tf * (float(ref.idf[j]) if j is not None else ref.log_n)
            squares[ci][len(g) - 1] += w * w
            if j is None:
                continue
            for k in range(1, min(tf, ref.max_tf) + 1):
                rows, cols = entries.setdefault((len(g), k), ([], []))
                rows.append(ci)
                cols.append(j)
    return torch.tensor(squares, dtype=torch.float64).sqrt(), _bigram_lengths(counts), entries


def _cosine_sums(
    num_cands: int, h_norm: torch.Tensor, entries: dict[tuple[int, int], tuple[list[int], list[int]]],
    ref: _ConstantCaptionRefs, n: int,
) -> torch.Tensor:
    """Clipped tf-idf cosine of every candidate with every reference, summed over the orders: (C, R)."""
    sims = torch.zeros(num_cands, len(ref.image_of), dtype=torch.float64)
    for k_order in range(1, n + 1):
        num = torch.zeros(num_cands, len(ref.image_of), dtype=torch.float64)
        for k in range(1, ref.max_tf + 1):
            if (k_order, k) not in entries:
                continue
            rows, cols = entries[k_order, k]
            mat, local = ref.mats[k_order, k]
            ind = torch.sparse_coo_tensor(torch.tensor([rows, local[cols].tolist()]),
                                          torch.ones(len(rows), dtype=torch.float64), (num_cands, mat.shape[0]),
                                          check_invariants=False)
            num += torch.sparse.mm(ind, mat)  # (C, G_order) x (G_order, R)
        den = h_norm[:, k_order - 1, None] * ref.norm[None, :, k_order - 1]
        sims += torch.where(den > 0, num / den.clamp_min(1e-300), num)
    return sims


def _constant_caption_scores(
    part: Sequence[str], ref: _ConstantCaptionRefs, n: int, sigma: float
) -> torch.Tensor:
    """Mean CIDEr-D over all images of each candidate given to every image: (C,)."""
    h_norm, h_len, entries = _candidate_side(part, ref, n)
    sims = _cosine_sums(len(part), h_norm, entries, ref, n)
    penalty = torch.exp(-((h_len[:, None] - ref.length[None, :]) ** 2) / (2 * sigma ** 2))
    per_ref = sims / n * penalty  # (C, R)
    per_image = torch.zeros(len(part), ref.num_images, dtype=torch.float64)
    per_image.index_add_(1, ref.image_of, per_ref)  # (C, R) -> (C, I): summed over each image's refs
    return (per_image / ref.refs_per_image).mean(1) * 10.0


def best_constant_caption(candidates: Sequence[str], refs: Sequence[Sequence[str]], sigma: float = 6.0,
                          chunk: int = 2048) -> tuple[str, float]:
    """The candidate that, given to every image, has the highest mean CIDEr-D against refs (what the language prior
    alone achieves), searched exhaustively: (caption, score on pycocoevalcap's scale).

    With idf_g from the references, the clipped numerator sum_g min(w_c, w_r) w_r equals
    sum_k sum_g [tf_c >= k] [tf_r >= k] tf_r idf_g^2, so each n-gram order is a few sparse x dense products of all
    candidates against all references at once.
    """
    n = 4
    cands = list(dict.fromkeys(candidates))
    if not cands or not refs:
        raise ValueError("best_constant_caption needs candidates and references")
    ref = _ConstantCaptionRefs.build(refs, n)
    best, best_score = "", -1.0
    for start in range(0, len(cands), chunk):
        part = cands[start:start + chunk]
        scores = _constant_caption_scores(part, ref, n, sigma)
        i = int(scores.argmax())
        if float(scores[i]) > best_score:
            best, best_score = part[i], float(scores[i])
    return best, best_score
