"""Scalar k-means in NumPy: the codebook that weight sharing and k-means quantization both use.

`kmeans` runs Lloyd's iterations from a chosen start (`init_centroids`: linear, density or
k-means++) and returns a `Codebook`: k float32 centroids and one index per weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FLOAT32_BYTES = 4
INITS = ("linear", "density", "kmeans++")


def check_clusters(k, n_weights: int, where: str = "the weights") -> int:
    """k must be an integer with 2 <= k <= number of weights; anything else is a ValueError."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"the number of clusters k must be an integer, got {k!r}")
    if k < 2:
        raise ValueError(f"k={k} clusters: k must be at least 2 "
                         "(one shared value throws the layer away)")
    if k > n_weights:
        raise ValueError(f"k={k} clusters is more than the {n_weights} weights of {where}: "
                         f"choose 2 <= k <= {n_weights}")
    return int(k)


def check_init(init: str) -> str:
    if init not in INITS:
        raise ValueError(f"unknown centroid initialisation {init!r}; choose one of {INITS}")
    return init


def init_centroids(weights: np.ndarray, k: int, init: str = "kmeans++",
                   seed: int = 0) -> np.ndarray:
    """k starting centroids (sorted, float64) from the flattened weights."""
    w = np.asarray(weights, np.float64).ravel()
    k = check_clusters(k, w.size)
    check_init(init)
    if init == "linear":      # evenly spaced between the smallest and the largest weight
        return np.linspace(w.min(), w.max(), k)
    if init == "density":     # equal steps in probability: many centroids where weights crowd
        # tfmot's probability levels, so the two can be compared; p = 1 puts one at the largest
        # weight.
        return np.quantile(w, np.linspace(0.01, 1.0, k), method="inverted_cdf")
    # k-means++: each next centroid drawn with probability proportional to the squared
    # distance to the nearest centroid chosen so far, so far-away weights get a centroid.
    rng = np.random.default_rng(seed)
    centroids = [w[rng.integers(w.size)]]
    d2 = (w - centroids[0]) ** 2
    for _ in range(1, k):
        total = d2.sum()
        pick = rng.choice(w.size, p=d2 / total) if total > 0 else rng.integers(w.size)
        centroids.append(w[pick])
        d2 = np.minimum(d2, (w - w[pick]) ** 2)
    return np.sort(np.array(centroids))


def assign(weights: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for every weight (centroids sorted ascending).

    In one dimension the boundaries between clusters are the midpoints of neighbouring
    centroids, so a binary search replaces an n-by-k table of distances.
    """
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    return np.searchsorted(midpoints, np.asarray(weights), side="left")


def reconstruction_mse(weights: np.ndarray, centroids: np.ndarray) -> float:
    """Mean squared error between the weights and their nearest centroids."""
    w = np.asarray(weights, np.float64).ravel()
    c = np.sort(np.asarray(centroids, np.float64).ravel())
    return float(np.mean((w - c[assign(w, c)]) ** 2))


@dataclass
class Codebook:
    """A clustered tensor: `centroids[indices]` is the tensor with every weight replaced."""
    centroids: np.ndarray      # (k,) float32, sorted
    indices: np.ndarray        # the tensor's shape, smallest unsigned integer type that holds k - 1
    mse_history: list          # reconstruction MSE after each Lloyd iteration

    @property
    def k(self) -> int:
        return len(self.centroids)

    def decode(self) -> np.ndarray:
        return self.centroids[self.indices]

    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.k)))

    def storage_bytes(self) -> int:
        """float32 codebook plus densely packed fixed-width indices."""
        return self.k * FLOAT32_BYTES + math.ceil(self.indices.size * self.index_bits() / 8)


def kmeans(weights: np.ndarray, k: int, init: str = "kmeans++", iterations: int = 100,
           seed: int = 0, *, centroids: np.ndarray | None = None, tol: float = 1e-9) -> Codebook:
    """Lloyd's k-means on the scalar weights: assign to the nearest centroid, move each centroid
    to the mean of its weights, repeat. Neither step can raise the squared error.

    Pass `centroids` to start from given values (for example tfmot's) instead of `init`.
    """
    w = np.asarray(weights, np.float64)
    flat = w.ravel()
    k = check_clusters(k, flat.size)
    if centroids is not None and len(centroids) != k:
        raise ValueError(f"got {len(centroids)} starting centroids for k={k} clusters")
    c = (np.sort(np.asarray(centroids, np.float64)) if centroids is not None
         else init_centroids(flat, k, init, seed))
    history = []
    for _ in range(iterations):
        idx = assign(flat, c)
        counts = np.bincount(idx, minlength=k)
        sums = np.bincount(idx, weights=flat, minlength=k)
        # An empty cluster keeps its centroid (a duplicate start, as tfmot's density start, leaves
        # one empty).
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        history.append(float(np.mean((flat - c[idx]) ** 2)))
        moved = np.max(np.abs(new - c))
        c = np.sort(new)
        if moved < tol:
            break
    idx = assign(flat, c)
    history.append(float(np.mean((flat - c[idx]) ** 2)))
    dtype = np.uint8 if k <= 256 else np.uint16 if k <= 65536 else np.uint32
    return Codebook(c.astype(np.float32), idx.astype(dtype).reshape(w.shape), history)
