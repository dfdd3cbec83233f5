"""Checkers for clustering's exercises: one Lloyd step of k-means, and the bytes of a codebook.

kmeans_step is judged against `kmeans.assign` (the nearest centroid) and the centroid update of
`kmeans.kmeans`, in the centroids' given order (kmeans itself sorts them); codebook_bytes
against `kmeans.Codebook.storage_bytes`.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from labkit import kmeans
from labkit.check import exercise, fail

FLOAT32_BYTES = kmeans.FLOAT32_BYTES


# ----------------------------------------------------------------------------- kmeans_step

def _nearest(weights: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """kmeans.assign for centroids in any order: the index into `centroids` as given."""
    order = np.argsort(centroids, kind="stable")
    return order[kmeans.assign(weights, centroids[order])]


def _update(weights: np.ndarray, labels: np.ndarray, centroids: np.ndarray,
            empty=None) -> np.ndarray:
    """Each centroid moved to the mean of its weights (kmeans.kmeans's update); an empty cluster
    keeps its centroid, or takes `empty` (what a typical mistake gives it)."""
    k = len(centroids)
    counts = np.bincount(labels, minlength=k)
    sums = np.bincount(labels, weights=weights, minlength=k)
    kept = centroids if empty is None else np.full(k, empty)
    return np.where(counts > 0, sums / np.maximum(counts, 1), kept)


def reference_step(weights, centroids) -> tuple[np.ndarray, np.ndarray]:
    """One Lloyd iteration with labkit's pieces, the centroids kept in their given order."""
    w = np.asarray(weights, np.float64).ravel()
    c = np.asarray(centroids, np.float64)
    labels = _nearest(w, c)
    return labels, _update(w, labels, c)


_KMEANS_BY_HAND = [  # (weights, centroids): small enough to work on paper
    ([0.1, 0.2, 0.9, 1.1], [0.0, 1.0]),   # -> labels [0, 0, 1, 1], centroids [0.15, 1.0]
    ([0.0, 0.2, 0.35, 1.0], [0.1, 0.5]),   # 0.35 is nearer 0.5 now, nearer 0.1 after the move
    ([-1.0, -0.8, 0.1, 0.3, 2.0], [2.5, -1.0, 0.0]),    # centroids not sorted: keep their order
    ([0.0, 0.2, 0.4], [0.1, 5.0]),                      # nothing is near 5.0: that cluster is empty
]


def _kmeans_cases(rng, count: int):
    """Random 1-D weights and k distinct centroids in random order, some far away (empty clusters),
    with no weight (nearly) halfway between two centroids, where either label would be right."""
    made = 0
    while made < count:
        n, k = int(rng.integers(10, 300)), int(rng.integers(2, 9))
        weights = rng.normal(0, float(rng.choice([0.05, 1.0, 20.0])), n)
        weights = weights.astype(np.float32 if rng.random() < 0.5 else np.float64)
        centroids = (rng.choice(weights.astype(np.float64), k, replace=False)
                     + rng.normal(0, 1e-3, k))
        if rng.random() < 0.3:   # one centroid beyond every weight: its cluster stays empty
            centroids[rng.integers(k)] = weights.max() + 10 * weights.std() + 1.0
        distances = np.sort(np.abs(weights[:, None].astype(np.float64) - centroids[None, :]),
                            axis=1)
        gap = np.min(distances[:, 1] - distances[:, 0])   # nearest minus second nearest
        if len(np.unique(centroids)) < k or gap < 1e-6 * (1 + np.abs(weights).max()):
            continue
        made += 1
        yield weights, centroids


def _close(got, expected, w) -> np.ndarray:
    """Elementwise: equal up to float32 round-off of means of weights as large as w's."""
    return np.isclose(got, expected, rtol=1e-5,
                      atol=1e-5 * float(np.max(np.abs(w), initial=0.0)) + 1e-12)


def _as_labels(labels, n: int, args):
    labels = np.asarray(labels)
    if labels.shape != (n,):
        hint = " (one label per weight, in the weights' order)" if labels.size != n else ""
        fail("kmeans_step", f"labels should have shape ({n},){hint}, got shape {labels.shape}",
             args)
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.number):
        fail("kmeans_step", f"labels should be integer cluster indices, got dtype {labels.dtype}",
             args)
    if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
        fail("kmeans_step", "labels should be whole numbers, the index of each weight's "
                            f"centroid; yours hold {labels[:6]} ... (did you return the "
                            "centroid values or distances?)", args)
    return labels.astype(np.int64)


def _diagnose_labels(got, expected, w, c, new, args) -> None:
    k = len(c)
    order = np.argsort(c, kind="stable")
    mistakes = [
        ("your labels come from the signed difference w - c: argmin of a signed number picks the "
         "most negative, not the nearest; use the distance np.abs(w - c)",
         np.argmin(w[:, None] - c[None, :], axis=1)),
        ("your labels come from the signed difference c - w: use the distance np.abs(w - c)",
         np.argmin(c[None, :] - w[:, None], axis=1)),
        ("your labels count in sorted order: you sorted the centroids. Keep the order you were "
         "given: label j means centroids[j]",
         np.argsort(order)[_nearest(w, c)] if not np.all(order == np.arange(k)) else None),
        ("your labels are the nearest of the NEW centroids: label every weight by the centroids "
         "you were given, then move the centroids (one iteration is assign, then update)",
         _nearest(w, new)),
        ("your labels start at 1: cluster indices run from 0 to k - 1", expected + 1),
        ("your labels point at the farthest centroid: take argmin of the distance, not argmax",
         np.argmax(np.abs(w[:, None] - c[None, :]), axis=1)),
    ]
    for message, labels in mistakes:
        if labels is not None and not np.array_equal(labels, expected) \
                and np.array_equal(got, labels):
            fail("kmeans_step", message, args)
    wrong = np.flatnonzero(got != expected)
    i = int(wrong[0])
    fail("kmeans_step", f"{len(wrong)} of {len(w)} labels are wrong. For example weight {i} "
                        f"({w[i]:.6g}) is nearest to centroid {expected[i]} "
                        f"({c[expected[i]]:.6g}), your label is {got[i]}", args)


def _diagnose_centroids(got, expected, labels, w, c, args) -> None:
    k = len(c)
    order = np.argsort(c, kind="stable")
    empty = np.bincount(labels, minlength=k) == 0
    if np.any(np.isnan(got)):
        if np.all(np.isnan(got) == empty):
            fail("kmeans_step", "an empty cluster got NaN (the mean of no weights): a centroid "
                                "with no weights keeps its value", args)
        fail("kmeans_step", f"new_centroids hold NaN at {np.flatnonzero(np.isnan(got)).tolist()}",
             args)
    mistakes = [
        ("an empty cluster's centroid became 0: a centroid with no weights keeps its value",
         _update(w, labels, c, empty=0.0) if empty.any() else None),
        ("your new centroids are sorted: keep the order you were given, "
         "new_centroids[j] moves centroids[j]",
         np.sort(expected) if not np.all(order == np.arange(k)) else None),
        ("your new centroids follow the sorted order: keep the order you were given, "
         "new_centroids[j] moves "
         "centroids[j]", expected[order] if not np.all(order == np.arange(k)) else None),
        ("you returned the centroids unchanged: move each to the mean of the "
         "weights labelled with it",
         c),
        ("your centroids are the SUM of their weights: divide by how many there are (the mean)",
         np.where(empty, c, np.bincount(labels, weights=w, minlength=k))),
        ("your centroids are the median of their weights: Lloyd's update is the mean",
         np.array([np.median(w[labels == j]) if not empty[j] else c[j] for j in range(k)])),
        ("you moved the centroids twice: one iteration is one assignment and one update",
         _update(w, _nearest(w, expected), expected)),
    ]
    for message, centroids in mistakes:
        if centroids is not None and not _close(centroids, expected, w).all() \
                and _close(got, centroids, w).all():
            fail("kmeans_step", message, args)
    j = int(np.flatnonzero(~_close(got, expected, w))[0])
    members = int(np.sum(labels == j))
    what = (f"the mean of its {members} weights" if members
            else "its old value (no weight is labelled with it)")
    fail("kmeans_step", f"new centroid {j} should be {expected[j]:.6g}, "
                        f"{what}; yours is {got[j]:.6g}", args)


def _judge_step(call, weights, centroids) -> None:
    weights, centroids = np.asarray(weights), np.asarray(centroids, dtype=np.float64)
    given_w, given_c = weights.copy(), centroids.copy()
    result = call(weights, centroids)
    args = (given_w, given_c)
    if not np.array_equal(centroids, given_c):
        fail("kmeans_step", "your function changed the centroids it was given: new_centroids "
                            "= centroids shares the array, so writing into one writes into "
                            "both (use centroids.copy())", args)
    if not np.array_equal(weights, given_w):
        fail("kmeans_step", "your function changed the weights it was given (an in-place sort or "
                            "assignment): work on a copy, the caller still needs them", args)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        length = f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""
        fail("kmeans_step", "return two things, (labels, new_centroids); got "
                            f"{type(result).__name__}{length}", args)
    w, c = given_w.astype(np.float64).ravel(), given_c
    expected_labels, expected_new = reference_step(w, c)
    labels = _as_labels(result[0], len(w), args)
    if not np.array_equal(labels, expected_labels):
        _diagnose_labels(labels, expected_labels, w, c, expected_new, args)
    new = np.asarray(result[1])
    if new.shape != c.shape:
        fail("kmeans_step", f"new_centroids should have shape {c.shape} (one per centroid, in the "
                            f"given order), got {new.shape}", args)
    if not np.issubdtype(new.dtype, np.number):
        fail("kmeans_step", f"new_centroids should be numbers, got dtype {new.dtype}", args)
    new = new.astype(np.float64)
    if not _close(new, expected_new, w).all():
        _diagnose_centroids(new, expected_new, expected_labels, w, c, args)


@exercise("kmeans_step", "03", "kmeans.kmeans",
          "kmeans_step(weights, centroids) -> (labels, new_centroids)")
def kmeans_step(call):
    """One Lloyd iteration on 1-D weights: 4 cases by hand (unsorted centroids, an empty cluster),
    then 30 random ones against labkit's nearest-centroid assignment and centroid update."""
    for weights, centroids in _KMEANS_BY_HAND:
        _judge_step(call, np.array(weights), np.array(centroids))
    rng = np.random.default_rng(303)
    cases = 30
    for weights, centroids in _kmeans_cases(rng, cases):
        _judge_step(call, weights, centroids)
    return (f"{len(_KMEANS_BY_HAND)} cases by hand, {cases} random ones against kmeans.assign "
            "and kmeans's update")


# ----------------------------------------------------------------------------- codebook_bytes

def reference_bytes(num_weights: int, clusters: int) -> int:
    """kmeans.Codebook.storage_bytes for `num_weights` indices into `clusters` centroids."""
    codebook = kmeans.Codebook(np.zeros(clusters, np.float32),
                                   np.broadcast_to(np.uint8(0), (num_weights,)), [])
    return codebook.storage_bytes()


def _bits(k: int) -> int:
    return max(1, math.ceil(math.log2(k)))


# (message, what the mistake returns for (n, k)); tried in this order on the first case that fails
_CODEBOOK_MISTAKES = [
    ("you returned bits, not bytes: divide the bits by 8 (and round up)",
     lambda n, k: k * 32 + n * _bits(k)),
    ("you returned bits, not bytes: the packed indices take n * bits / 8 bytes, the codebook k * 4",
     lambda n, k: k * FLOAT32_BYTES + n * _bits(k)),
    ("you forgot the codebook: the k centroids are stored too, as float32 (4 bytes each)",
     lambda n, k: math.ceil(n * _bits(k) / 8)),
    ("you counted one byte (8 bits) per index: pack the indices densely, ceil(log2 k) bits each",
     lambda n, k: k * FLOAT32_BYTES + n),
    ("you did not round log2(k) up: an index is a whole number of bits, math.ceil(math.log2(k))",
     lambda n, k: k * FLOAT32_BYTES + math.ceil(n * math.log2(k) / 8) if k > 1 else None),
    ("you did not round log2(k) up: an index is a whole number of bits, math.ceil(math.log2(k))",
     lambda n, k: k * FLOAT32_BYTES + n * math.log2(k) / 8 if k > 1 else None),
    ("you rounded log2(k) down: with k = 5 an index needs 3 bits (2 bits name only 4 centroids)",
     lambda n, k: k * FLOAT32_BYTES + math.ceil(n * max(1, math.floor(math.log2(k))) / 8)),
    ("you used log2(k) + 1 bits: ceil(log2 k) is enough (16 centroids need 4 bits, not 5)",
     lambda n, k: k * FLOAT32_BYTES + math.ceil(n * (math.floor(math.log2(k)) + 1) / 8)),
    ("with one cluster you counted 0 index bits: this book stores at least 1 bit per index, "
     "max(1, ceil(log2 k))", lambda n, k: k * FLOAT32_BYTES if k == 1 else None),
    ("the packed indices end in a partial byte: round UP to whole bytes (math.ceil), the "
     "last byte is still stored",
     lambda n, k: k * FLOAT32_BYTES + n * _bits(k) // 8),
    ("the packed indices are n * bits / 8 bytes, rounded up to a whole number (math.ceil)",
     lambda n, k: k * FLOAT32_BYTES + n * _bits(k) / 8),
    ("you counted the codebook as float64 (8 bytes per centroid): the "
     "centroids are float32, 4 bytes",
     lambda n, k: k * 8 + math.ceil(n * _bits(k) / 8)),
    ("you counted the codebook at 1 byte per centroid: each centroid is a float32, 4 bytes",
     lambda n, k: k + math.ceil(n * _bits(k) / 8)),
    ("you stored a float32 per weight: the codebook's point is to store an "
     "index per weight instead",
     lambda n, k: k * FLOAT32_BYTES + n * FLOAT32_BYTES),
]

_CODEBOOK_BY_HAND = [  # (num_weights, clusters)
    (100, 16),        # 16 * 4 + 100 * 4 / 8 = 64 + 50
    (401_408, 16),    # the baseline's dense1 at k = 16
    (100, 5),         # 5 centroids need 3 bits: 20 + ceil(37.5)
    (10, 2),          # 1 bit each: 8 + ceil(1.25)
    (1000, 256),      # 8 bits: 1024 + 1000
    (1000, 257),      # one more centroid, one more bit: 1028 + 1125
    (7, 1),           # one cluster: still 1 bit per index here
]


def _as_bytes(result):
    if isinstance(result, np.ndarray) and result.size == 1:
        result = result.item()
    if isinstance(result, bool) or not isinstance(result, numbers.Real):
        return None
    return float(result) if math.isfinite(float(result)) else None


def _judge_bytes(call, n: int, k: int) -> None:
    expected = reference_bytes(n, k)
    result = call(n, k)
    got = _as_bytes(result)
    if got is None:
        fail("codebook_bytes", f"return one number of bytes (an int), got {result!r} "
                               f"({type(result).__name__})",
             (n, k))
    if got == expected:
        return
    for message, mistake in _CODEBOOK_MISTAKES:
        value = mistake(n, k)
        if value is not None and value != expected and math.isclose(value, got, rel_tol=1e-9):
            fail("codebook_bytes", f"{message}. Expected {expected:,} bytes, got {got:,g}.", (n, k))
    if not got.is_integer():
        fail("codebook_bytes", f"return whole bytes (an int): {got:,g} is not "
                               "a whole number of bytes", (n, k))
    bits = _bits(k)
    fail("codebook_bytes", f"expected {expected:,} bytes: {k} float32 centroids "
                           f"({k * FLOAT32_BYTES:,} B) + {n:,} indices of {bits} bit(s) packed "
                           f"into {math.ceil(n * bits / 8):,} B; got {got:,g}", (n, k))


@exercise("codebook_bytes", "03", "kmeans.Codebook.storage_bytes",
          "codebook_bytes(num_weights, clusters) -> int")
def codebook_bytes(call):
    """Bytes of a float32 codebook plus densely packed indices: 7 cases by hand, then 40 random ones
    against kmeans.Codebook.storage_bytes."""
    for n, k in _CODEBOOK_BY_HAND:
        _judge_bytes(call, n, k)
    rng = np.random.default_rng(304)
    cases = 40
    for _ in range(cases):
        k = int(rng.choice([int(rng.integers(1, 70)), 2 ** int(rng.integers(1, 13)),
                            int(rng.integers(2, 5000))]))
        n = int(rng.integers(1, 2_000_000))
        _judge_bytes(call, n, k)
    return (f"{len(_CODEBOOK_BY_HAND)} cases by hand, {cases} random ones against "
            "kmeans.Codebook.storage_bytes")
