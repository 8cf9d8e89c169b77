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
        n = self.n

        # Images sharing the same references (the SCST samples of one image) form one group whose refs are cooked once.
        group_of_key: dict[tuple[str, ...], int] = {}
        group_of_hyp = np.fromiter(
            (group_of_key.setdefault(tuple(r), len(group_of_key)) for r in refs), dtype=np.int64, count=len(hyps)
        )
        group_refs = list(group_of_key)
        if any(len(r) == 0 for r in group_refs):
            raise ValueError("every image needs at least one reference")
        num_groups = len(group_refs)
        hyp_order = np.argsort(group_of_hyp, kind="stable")  # hyps in group order
        hyps_per_group = np.bincount(group_of_hyp, minlength=num_groups)
        refs_per_group = np.fromiter(map(len, group_refs), dtype=np.int64, count=num_groups)

        # Sentences laid out group by group: the group's refs (r = 0..m-1), then its hyps (r = m..m+h-1).
        sentences: list[str] = []
        hyp_iter = iter(hyp_order.tolist())
        for g, grefs in enumerate(group_refs):
            sentences.extend(grefs)
            sentences.extend(hyps[next(hyp_iter)] for _ in range(int(hyps_per_group[g])))
        sents_per_group = refs_per_group + hyps_per_group
        group_first_sent = np.cumsum(sents_per_group) - sents_per_group
        num_sents = len(sentences)
        group_of_sent = np.repeat(np.arange(num_groups, dtype=np.int64), sents_per_group)
        r_of_sent = np.arange(num_sents, dtype=np.int64) - group_first_sent[group_of_sent]

        words, lengths = _split(sentences)
        num_tokens = len(words)
        word_ids = _local_word_ids(words)
        rem = _remaining(lengths) if num_tokens else np.zeros(0, dtype=np.int64)
        sent_of_pos = np.repeat(np.arange(num_sents, dtype=np.int64), lengths)

        # Intern the n-grams: order-k id = compact id of (order-(k-1) id of the prefix, last word).
        positions: list[np.ndarray] = []
        level_ids: list[np.ndarray] = []
        current = word_ids
        max_count = max(num_tokens, 1)
        for k in range(1, n + 1):
            if k == 1:
                pos, ids = np.arange(num_tokens, dtype=np.int64), word_ids
            else:
                pos = np.flatnonzero(rem >= k)
                uniq, ids = np.unique(current[pos] * max_count + word_ids[pos + k - 1], return_inverse=True)
                ids = ids.astype(np.int64, copy=False)
                current = np.empty_like(word_ids)
                current[pos] = ids
            positions.append(pos)
            level_ids.append(ids)
        # Global n-gram id: local id * n + (order - 1), so the order is gid % n.
        num_gids = max_count * n
        gid = np.concatenate([ids * n + k for k, ids in enumerate(level_ids)])
        sent = np.concatenate([sent_of_pos[pos] for pos in positions])

        # Sort occurrences by (group, n-gram, sentence-in-group) and count them: term frequencies per sentence.
        grp_u, gid_u, r_u, tf, new_pair = _count_triples(
            group_of_sent[sent], gid, r_of_sent[sent], num_groups, num_gids, int(sents_per_group.max())
        )
        sent_u = group_first_sent[grp_u] + r_u
        order_u = gid_u % n
        is_ref = r_u < refs_per_group[grp_u]

        # Document frequencies and idf.
        if self._corpus is None:
            first_ref = new_pair & is_ref  # refs sort before hyps, so a pair's first entry is a ref if any ref has it
            df_gid = np.bincount(
                gid_u[first_ref], weights=hyps_per_group[grp_u[first_ref]].astype(np.float64), minlength=num_gids
            )
            log_num_images = float(np.log(float(len(hyps))))
        else:
            df_gid = np.zeros(num_gids, dtype=np.float64)
            for k, (ids, df) in enumerate(zip(level_ids, self._corpus.lookup(words, positions))):
                df_gid[ids * n + k] = df
            log_num_images = self._corpus.log_num_images
        vec = tf.astype(np.float64) * (log_num_images - np.log(np.maximum(df_gid[gid_u], 1.0)))
        norm = np.sqrt(np.bincount(sent_u * n + order_u, weights=vec * vec, minlength=num_sents * n)).reshape(-1, n)

        # Clipped dot products: every hyp entry meets the ref entries of its (group, n-gram) run.
        run = np.cumsum(new_pair) - 1
        run_start = np.flatnonzero(new_pair)
        refs_in_run = np.bincount(run[is_ref], minlength=len(run_start))
        hyp_entries = np.flatnonzero(~is_ref)
        pair_count = refs_in_run[run[hyp_entries]]
        hyp_rep = np.repeat(hyp_entries, pair_count)
        offsets = np.cumsum(pair_count) - pair_count
        ref_rep = np.arange(len(hyp_rep), dtype=np.int64) + np.repeat(run_start[run[hyp_entries]] - offsets, pair_count)
        v_hyp, v_ref = vec[hyp_rep], vec[ref_rep]
        contrib = np.minimum(v_hyp, v_ref) * v_ref

        # Hyp numbering in layout order; pair (hyp, ref j) index = pair_base[hyp] + j.
        num_hyps = len(hyps)
        hyp_group = group_of_hyp[hyp_order]
        hyp_first = np.cumsum(hyps_per_group) - hyps_per_group
        refs_of_hyp = refs_per_group[hyp_group]
        pair_base = np.cumsum(refs_of_hyp) - refs_of_hyp
        num_pairs = int(refs_of_hyp.sum())
        grp_h = grp_u[hyp_rep]
        hyp_num = hyp_first[grp_h] + r_u[hyp_rep] - refs_per_group[grp_h]
        pair_id = pair_base[hyp_num] + r_u[ref_rep]
        dot = np.bincount(pair_id * n + order_u[hyp_rep], weights=contrib, minlength=num_pairs * n)
        dot = dot.astype(np.float64, copy=False).reshape(-1, n)  # bincount of nothing is int64

        # Cosine, Gaussian penalty on the "length" (the bigram count, the original code's quirk), mean over n.
        hyp_sent = group_first_sent[hyp_group] + refs_of_hyp + (np.arange(num_hyps) - hyp_first[hyp_group])
        pair_hyp = np.repeat(np.arange(num_hyps, dtype=np.int64), refs_of_hyp)
        ref_sent = group_first_sent[hyp_group][pair_hyp] + (np.arange(num_pairs, dtype=np.int64) - pair_base[pair_hyp])
        bigrams = np.maximum(lengths - 1, 0) if n >= 2 else np.zeros_like(lengths)
        delta = (bigrams[hyp_sent][pair_hyp] - bigrams[ref_sent]).astype(np.float64)
        denom = norm[hyp_sent][pair_hyp] * norm[ref_sent]
        cos = np.divide(dot, denom, out=dot.copy(), where=denom != 0)
        cos *= np.exp(-(delta**2) / (2 * self.sigma**2))[:, None]
        per_hyp = np.add.reduceat(cos, pair_base, axis=0) if num_pairs else np.zeros((num_hyps, n))
        scores_layout = per_hyp.mean(axis=1) / refs_of_hyp * 10.0
        scores = np.empty(num_hyps, dtype=np.float64)
        scores[hyp_order] = scores_layout
        return float(np.mean(scores)), scores


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
    words = sentence.split()
    out: dict[tuple[str, ...], int] = {}
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            g = tuple(words[i:i + k])
            out[g] = out.get(g, 0) + 1
    return out


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
    flat = [r for rs in refs for r in rs]
    image_of = torch.tensor([i for i, rs in enumerate(refs) for _ in rs])
    refs_per_image = torch.bincount(image_of).double()
    log_n = np.log(float(len(refs)))
    ref_counts = [_ngram_counts(r, n) for r in flat]
    df: dict[tuple[str, ...], int] = {}
    for rs in refs:
        for g in {g for r in rs for g in _ngram_counts(r, n)}:
            df[g] = df.get(g, 0) + 1
    gram_id = {g: j for j, g in enumerate(df)}
    idf = np.array([log_n - np.log(max(1.0, float(df[g]))) for g in gram_id])
    order = np.array([len(g) for g in gram_id])
    # reference side: weights, norms and bigram-count lengths
    r_rows, r_cols, r_tf = [], [], []
    for j, cnt in enumerate(ref_counts):
        for g, tf in cnt.items():
            r_rows.append(j)
            r_cols.append(gram_id[g])
            r_tf.append(tf)
    r_rows, r_cols, r_tf = np.array(r_rows), np.array(r_cols), np.array(r_tf, dtype=np.float64)
    r_w = r_tf * idf[r_cols]
    r_norm = np.zeros((len(flat), n))
    np.add.at(r_norm, (r_rows, order[r_cols] - 1), r_w ** 2)
    r_norm = torch.from_numpy(np.sqrt(r_norm))
    r_len = torch.tensor([sum(tf for g, tf in c.items() if len(g) == 2) for c in ref_counts], dtype=torch.float64)
    max_tf = int(r_tf.max())
    ref_mats = {}  # (order, k) -> dense (G, R): [tf_r >= k] tf_r idf^2, on the n-grams of that order
    for k_order in range(1, n + 1):
        cols = np.nonzero(order == k_order)[0]
        local = np.full(len(gram_id), -1)
        local[cols] = np.arange(len(cols))
        sel = order[r_cols] == k_order
        for k in range(1, max_tf + 1):
            keep = sel & (r_tf >= k)
            mat = torch.zeros(len(cols), len(flat), dtype=torch.float64)
            mat[local[r_cols[keep]], r_rows[keep]] = torch.from_numpy(r_tf[keep] * idf[r_cols[keep]] ** 2)
            ref_mats[k_order, k] = (mat, local)
    best, best_score = "", -1.0
    for start in range(0, len(cands), chunk):
        part = cands[start:start + chunk]
        counts = [_ngram_counts(c, n) for c in part]
        h_norm = torch.zeros(len(part), n, dtype=torch.float64)
        h_len = torch.tensor([sum(tf for g, tf in c.items() if len(g) == 2) for c in counts], dtype=torch.float64)
        sims = torch.zeros(len(part), len(flat), dtype=torch.float64)
        entries: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
        for ci, cnt in enumerate(counts):
            for g, tf in cnt.items():
                j = gram_id.get(g)
                w = tf * (idf[j] if j is not None else log_n)
                h_norm[ci, len(g) - 1] += w * w
                if j is None:
                    continue
                for k in range(1, min(tf, max_tf) + 1):
                    rows, cols = entries.setdefault((len(g), k), ([], []))
                    rows.append(ci)
                    cols.append(j)
        h_norm = h_norm.sqrt()
        for k_order in range(1, n + 1):
            num = torch.zeros(len(part), len(flat), dtype=torch.float64)
            for k in range(1, max_tf + 1):
                if (k_order, k) not in entries:
                    continue
                rows, cols = entries[k_order, k]
                mat, local = ref_mats[k_order, k]
                ind = torch.sparse_coo_tensor(torch.tensor([rows, local[cols].tolist()]),
                                              torch.ones(len(rows), dtype=torch.float64), (len(part), mat.shape[0]),
                                              check_invariants=False)
                num += torch.sparse.mm(ind, mat)
            den = h_norm[:, k_order - 1, None] * r_norm[None, :, k_order - 1]
            sims += torch.where(den > 0, num / den.clamp_min(1e-300), num)
        penalty = torch.exp(-((h_len[:, None] - r_len[None, :]) ** 2) / (2 * sigma ** 2))
        per_ref = sims / n * penalty  # (C, R)
        per_image = torch.zeros(len(part), len(refs), dtype=torch.float64).index_add_(1, image_of, per_ref)
        scores = (per_image / refs_per_image).mean(1) * 10.0
        i = int(scores.argmax())
        if float(scores[i]) > best_score:
            best, best_score = part[i], float(scores[i])
    return best, best_score
