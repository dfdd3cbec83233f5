"""Checkers for pruning's exercises: the magnitude mask and the 2:4 (m:n) mask.

magnitude_mask is judged by the rule of the exercise (zero the round(sparsity * size) smallest |w|;
where sparsity * size ends in exactly .5 either neighbouring count is right; weights tied at the
threshold may go either way), against labkit's `pruning.magnitude_mask` and, on one small layer,
tfmot's own mask (`pruning.tfmot_masks`). m_by_n_mask must zero the m smallest |w| of every n
consecutive weights along the input axis (tfmot's reading of m): `pruning.m_by_n_violations`
finds none. labkit.pruning imports TensorFlow: the checkers import it, not this module.
"""
from __future__ import annotations

import math

import numpy as np

from labkit.check import exercise, fail


def _as_mask(name, result, shape, args):
    """The learner's answer as a bool array of `shape`, or an ExerciseError saying what is off."""
    try:
        mask = np.asarray(result)
    except Exception:   # noqa: BLE001  (anything NumPy cannot read is the wrong kind of answer)
        mask = None
    if mask is None or mask.dtype == object:
        fail(name, f"return a NumPy array of 0/1 (or True/False), got {type(result).__name__}",
             args)
    if mask.shape != tuple(shape):
        hint = " (reshape it to the weights' shape: mask.reshape(weights.shape))" \
            if mask.size == math.prod(shape) else ""
        fail(name, f"wrong shape: expected {tuple(shape)}, got {mask.shape}{hint}", args)
    if mask.dtype == bool:
        return mask
    if not np.issubdtype(mask.dtype, np.number):
        fail(name, f"return 0/1 or True/False values, got dtype {mask.dtype}", args)
    if not np.all((mask == 0) | (mask == 1)):
        odd = mask[(mask != 0) & (mask != 1)].ravel()[:3]
        fail(name, "a mask holds only 0 and 1 (or False and True), found values like "
                   f"{odd.tolist()}: did you return the pruned weights (weights * mask) or the "
                   "magnitudes instead of the mask?",
             args)
    return mask == 1


# ----------------------------------------------------------------------------- magnitude_mask

def allowed_counts(size: int, sparsity: float) -> set:
    """How many weights may be zeroed: round(sparsity * size), both neighbours where that ends in .5
    (up to float round-off, which the ways of computing it differ by), and size - 1 where the rule
    would zero everything (labkit, as tfmot does, keeps at least one weight)."""
    exact = sparsity * size
    counts = {int(round(exact))}
    if abs(exact - math.floor(exact) - 0.5) < 1e-6:
        counts |= {math.floor(exact), math.ceil(exact)}
    if size in counts:
        counts.add(size - 1)
    return counts


def _count_fits(magnitudes, kept, count: int) -> bool:
    """Is `kept` a right mask with `count` zeros, some weights tied at
    the threshold going either way?

    Right: every pruned |w| <= every kept |w|, and the number pruned is `count`, or differs from it
    only by weights equal to the threshold (those may all be kept, as tfmot does, or all pruned)."""
    flat, keep = magnitudes.ravel(), kept.ravel()
    pruned = int(np.sum(~keep))
    if pruned == count:
        return bool(pruned == 0 or pruned == flat.size or flat[~keep].max() <= flat[keep].min())
    ordered = np.sort(flat)
    if count == 0 or count == flat.size or ordered[count - 1] != ordered[count]:
        return False    # no tie at the threshold: the count must be exact
    tie = ordered[count - 1]
    return bool(np.all(keep[flat > tie]) and not np.any(keep[flat < tie]))


def mask_is_right(weights, sparsity, kept) -> bool:
    """The exercise's rule, with every reading it allows (used on the
    learner's mask and in the tests)."""
    magnitudes = np.abs(np.asarray(weights, dtype=np.float64))
    return any(_count_fits(magnitudes, kept, count)
               for count in allowed_counts(magnitudes.size, sparsity))


def _diagnose_magnitude(weights, sparsity, kept, args, reference=None):
    """Name the likely mistake behind a wrong mask (the reading of each
    typical mistake is tried in turn)."""
    name, size = "magnitude_mask", np.size(weights)
    counts = sorted(allowed_counts(size, sparsity))
    expected = " or ".join(str(c) for c in counts)
    pruned = int(np.sum(~kept))
    magnitudes = np.abs(np.asarray(weights, dtype=np.float64))
    if pruned == size and counts == [0]:
        fail(name, f"you pruned every weight, expected none: with sparsity {sparsity} "
                   "nothing goes (a threshold taken from sorted[count - 1] with count = "
                   "0 picks the LARGEST |w|)", args)
    if mask_is_right(weights, sparsity, ~kept):
        fail(name, "your mask is inverted: it is 1 (True) where a weight is pruned. The "
                   "mask multiplies the weights, so it must be 1 for the weights kept "
                   "and 0 for the smallest |w|", args)
    if pruned in counts:
        if _count_fits(-magnitudes, kept, pruned):
            fail(name, f"you kept the smallest weights and pruned the largest: zero the {pruned} "
                       "weights with the SMALLEST |w| (np.argsort sorts ascending: the first "
                       "indices are the smallest)", args)
        signed = np.asarray(weights, dtype=np.float64)
        if _count_fits(signed, kept, pruned):
            fail(name, "you compared signed values, not magnitudes: a large negative weight like "
                       "-2.0 matters as much as +2.0. Sort by np.abs(weights)", args)
        if _count_fits(-signed, kept, pruned):
            fail(name, "you pruned the largest signed values: sort by "
                       "np.abs(weights), and zero the smallest", args)
    flat, keep = magnitudes.ravel(), kept.ravel()
    monotone = pruned in (0, size) or flat[~keep].max() <= flat[keep].min()
    if monotone:
        exact = sparsity * size
        if pruned == size - counts[-1] and pruned not in counts:
            fail(name, f"you pruned {pruned} weights and kept {size - pruned}: sparsity is "
                       "the fraction set to ZERO, so zero round(sparsity * size) = "
                       f"{expected} of the {size} weights", args)
        if pruned in (math.floor(exact), math.ceil(exact)) and pruned not in counts:
            how = ("rounded down (int() and // truncate)" if pruned == math.floor(exact)
                   else "rounded up")
            fail(name, f"you pruned {pruned} weights, expected {expected}: sparsity * size = "
                       f"{exact:g}, which you {how}; use round(sparsity * size)", args)
        fail(name, f"you pruned {pruned} weights (the smallest |w|, rightly), expected "
                   f"{expected} = round({sparsity} * "
                   f"{size})" + (" (off by one?)" if min(abs(pruned - c) for c in counts) == 1
                                                    else ""), args)
    differ = "" if reference is None else f"; it differs from labkit's pruning.magnitude_mask at " \
                                          f"{int(np.sum(kept != reference))} weights"
    fail(name, f"your mask zeros {pruned} weights (expected {expected}), but not the smallest |w|: "
               f"some pruned weight is larger in magnitude than some kept one{differ}", args)


def _judge_magnitude(call, weights, sparsity, reference=None):
    """The learner's mask on one case; `reference` (labkit's mask) only sharpens the message."""
    args = (weights, sparsity)
    kept = _as_mask("magnitude_mask", call(weights.copy(), sparsity), weights.shape, args)
    if not mask_is_right(weights, sparsity, kept):
        _diagnose_magnitude(weights, sparsity, kept, args, reference)
    return kept


_MAGNITUDE_BY_HAND = [  # (weights, sparsity), worked by hand
    (np.array([0.4, -0.9, 0.05, 0.7, -0.2, 0.3, 1.5, -0.6]), 0.25),   # zero 0.05 and -0.2
    # zero 0.1, -0.3, 0.5: mask [[0,1,0],[1,0,1]]
    (np.array([[0.5, -2.0, 0.1], [3.0, -0.3, 1.0]]), 0.5),
    (np.array([0.3, -0.1, 0.2, 0.8, -0.5]), 0.5),   # 2.5: zero 2 or 3 weights, both right
    (np.array([[0.2, -0.7], [0.9, -0.4]]), 0.0),                    # sparsity 0: keep everything
    (np.array([1.0, -1.0, 1.0, 1.0, 2.0, -3.0]), 0.5),   # |w| = 1 four times: ties go either way
]


def _tfmot_case(call):
    """Compare with tfmot's mask on one small Dense layer (pruning.tfmot_masks:
    tfmot's mask update run once)."""
    # imported here: labkit.check itself loads without TensorFlow
    import tf_keras as keras

    from labkit import pruning
    rng = np.random.default_rng(202)
    kernel = rng.normal(0, 0.5, (12, 5)).astype(np.float32)   # 60 weights; 0.7 * 60 = 42 zeros
    image = keras.Input((12,), name="features")
    # zero initializers draw no random numbers, so the notebook's seeded results stay the same
    dense = keras.layers.Dense(5, kernel_initializer="zeros", name="dense")
    model = keras.Model(image, dense(image), name="one_dense")
    dense.set_weights([kernel, np.zeros(5, np.float32)])
    theirs = pruning.tfmot_masks(model, 0.7)["dense"]
    kept = _judge_magnitude(call, kernel, 0.7)
    if not np.array_equal(kept, theirs):
        fail("magnitude_mask", f"your mask differs from tfmot's at {int(np.sum(kept != theirs))} "
                               f"of {kernel.size} weights", (kernel, 0.7))


@exercise("magnitude_mask", "02", "pruning.magnitude_mask",
          "magnitude_mask(weights, sparsity) -> 0/1 mask with the weights' shape")
def magnitude_mask(call):
    """Zero the round(sparsity * size) smallest |w|: 5 cases by hand (a .5 count and ties included),
    30 random ones against the rule and pruning.magnitude_mask, and one
    layer against tfmot's mask."""
    # imported here: labkit.check itself loads without TensorFlow
    from labkit import pruning
    for weights, sparsity in _MAGNITUDE_BY_HAND:
        _judge_magnitude(call, weights, sparsity)
    rng = np.random.default_rng(201)
    shapes = [(10,), (6, 7), (3, 3, 2, 4), (5, 1), (40, 3), (2, 3, 4)]
    cases = 30
    for i in range(cases):
        shape = shapes[i % len(shapes)]
        dtype = np.float32 if i % 2 else np.float64
        if i % 5 == 4:      # coarse values: many ties at the threshold
            weights = (rng.integers(-4, 5, shape) / 4).astype(dtype)
        else:
            weights = rng.normal(0, 0.3, shape).astype(dtype)
        sparsity = float(rng.choice([0.1, 0.25, 0.3, 0.5, 0.6, 0.75, 0.8, 0.9, 0.95]))
        reference = pruning.magnitude_mask(weights, sparsity)
        _judge_magnitude(call, weights, sparsity, reference=reference)
    _tfmot_case(call)
    return (f"{len(_MAGNITUDE_BY_HAND)} cases by hand, {cases} random ones, one layer against "
            "tfmot's mask")


# ----------------------------------------------------------------------------- m_by_n_mask

def _groups(array, n, axis=-2):
    """Groups of n consecutive entries along `axis`, one group per row."""
    return np.moveaxis(np.asarray(array), axis, -1).reshape(-1, n)


def _rows_keep_largest(values, keep, m) -> np.ndarray:
    """Per row: keeps exactly m entries, none smaller than an entry it drops (ties either way)."""
    kept_min = np.where(keep, values, np.inf).min(axis=1)
    dropped_max = np.where(keep, -np.inf, values).max(axis=1)
    return (keep.sum(axis=1) == m) & (kept_min >= dropped_max)


def m_by_n_is_right(kernel, kept, m, n) -> bool:
    """Does `kept` keep the m largest |w| of every n consecutive
    weights along the input axis (-2)?"""
    return bool(np.all(_rows_keep_largest(_groups(np.abs(np.asarray(kernel, np.float64)), n),
                                          _groups(kept, n), m)))


def _diagnose_m_by_n(kernel, kept, m, n, args, kwargs):
    """Name the likely mistake behind a wrong m:n mask (each typical
    mistake's reading tried in turn)."""
    name = "m_by_n_mask"
    values = np.asarray(kernel, dtype=np.float64)
    magnitudes, groups = _groups(np.abs(values), n), _groups(kept, n)
    flat_magnitudes, flat_kept = np.abs(values).reshape(-1, n), kept.reshape(-1, n)
    if np.all(_rows_keep_largest(-magnitudes, groups, m)):
        fail(name, f"you kept the {m} SMALLEST |w| of each group (or inverted the "
                   f"mask): the mask is 1 for the {m} largest |w| of each group "
                   f"of {n}, 0 for the rest", args, kwargs)
    if np.all(_rows_keep_largest(flat_magnitudes, flat_kept, m)):
        fail(name, f"your groups run along the OUTPUT axis: reshape(-1, {n}) on the kernel as "
                   "stored groups consecutive entries of the last axis (the outputs). Groups run "
                   "along the input axis, axis -2 (axis 0 of a Dense kernel, axis 2 of a Conv2D "
                   "kernel): np.moveaxis(kernel, -2, -1) first, and back afterwards", args, kwargs)
    if values.ndim == 4 and np.all(_rows_keep_largest(_groups(np.abs(values), n, 0),
                                                      _groups(kept, n, 0), m)):
        fail(name, "you grouped along axis 0: right for a Dense kernel (inputs, outputs), but a "
                   "Conv2D kernel is (height, width, inputs, outputs), so its inputs are axis "
                   "2. Use axis -2 for both",
             args, kwargs)
    if np.all(_rows_keep_largest(_groups(values, n), groups, m)):
        fail(name, "you compared signed values, not magnitudes: a weight of -2.0 matters as "
                   "much as +2.0 (use np.abs)", args, kwargs)
    per_group = sorted(set(groups.sum(axis=1).tolist()))
    if per_group != [m]:
        ignored = " (did you ignore the arguments m and n?)" if (m, n) != (2, 4) else ""
        fail(name, f"each group of {n} consecutive inputs must keep exactly {m} weights; your "
                   f"groups keep {per_group}{ignored}", args, kwargs)
    wrong = int(np.sum(~_rows_keep_largest(magnitudes, groups, m)))
    fail(name, f"each group keeps {m} weights, but {wrong} of the {len(groups)} groups do not "
               f"keep their {m} largest |w|", args, kwargs)


def _judge_m_by_n(call, kernel, m, n):
    """m is the number of zeros per group of n, as in tfmot's
    sparsity_m_by_n: n - m weights are kept."""
    # imported here: labkit.check itself loads without TensorFlow
    from labkit import pruning
    args, kwargs = (kernel,), {"m": m, "n": n}
    kept = _as_mask("m_by_n_mask", call(kernel.copy(), m=m, n=n), kernel.shape, args)
    keep = n - m
    if not m_by_n_is_right(kernel, kept, keep, n):
        if keep != m and sorted(set(_groups(kept, n).sum(axis=1).tolist())) == [m]:
            fail("m_by_n_mask", f"your groups keep m={m} weights each; m is the number of ZEROS in "
                                "every group of n (tfmot's sparsity_m_by_n reading): keep the n - "
                                f"m = {keep} largest |w|",
                 args, kwargs)
        _diagnose_m_by_n(kernel, kept, keep, n, args, kwargs)
    # the pattern the sparse tensor cores need, counted as pruning.m_by_n_violations counts
    # it: n - m zeros in every group
    violations = pruning.m_by_n_violations(kernel * kept, m, n)
    if violations:
        fail("m_by_n_mask", f"{violations} groups of your pruned kernel hold fewer than {m} zeros",
             args, kwargs)


# (kernel, m, n): Dense kernels (inputs, outputs); the groups run down each column
_M_BY_N_BY_HAND = [
    # keep rows 1, 2 | rows 0, 1
    (np.array([[0.1, 4.0], [-0.9, 3.0], [0.5, -2.0], [-0.2, 1.0]]), 2, 4),
    # keep -0.8, 0.6 | 0.4, -0.5
    (np.array([[0.3], [-0.8], [0.6], [0.1], [0.2], [0.4], [-0.5], [0.05]]), 2, 4),
]


@exercise("m_by_n_mask", "02", "pruning.m_by_n_violations",
          "m_by_n_mask(kernel, m=2, n=4) -> mask with m zeros (the smallest |w|) "
          "in each group of n inputs")
def m_by_n_mask(call):
    """Zero the m smallest |w| of every n consecutive weights along the input axis (axis -2), as
    tfmot's sparsity_m_by_n=(m, n) does: 2 cases by hand, then random Dense and Conv2D kernels at
    2:4, 1:2, 4:8, 1:4 and 3:4, each also counted clean by pruning.m_by_n_violations."""
    for kernel, m, n in _M_BY_N_BY_HAND:
        _judge_m_by_n(call, kernel, m, n)
    kernel = _M_BY_N_BY_HAND[0][0]
    defaults = _as_mask("m_by_n_mask", call(kernel.copy()), kernel.shape, (kernel,))
    if not m_by_n_is_right(kernel, defaults, 2, 4):
        fail("m_by_n_mask", "right with m=2, n=4 given, wrong with the defaults: keep "
                            "m=2, n=4 as the defaults",
             (kernel,))
    rng = np.random.default_rng(203)
    shapes = [(8, 4), (3, 3, 8, 4), (16, 8), (1, 1, 8, 12), (5, 5, 4, 8), (24, 4)]
    patterns = [(2, 4), (1, 2), (4, 8), (1, 4), (3, 4)]
    cases = 25
    for i in range(cases):
        shape, (m, n) = shapes[i % len(shapes)], patterns[i % len(patterns)]
        if shape[-2] % n:
            shape = (*shape[:-2], n, shape[-1])
        dtype = np.float32 if i % 2 else np.float64
        kernel = rng.normal(0, 0.3, shape).astype(dtype)
        if i % 4 == 3:      # coarse values: ties inside a group
            kernel = (np.round(kernel * 4) / 4).astype(dtype)
        _judge_m_by_n(call, kernel, m, n)
    return (f"{len(_M_BY_N_BY_HAND)} cases by hand, {cases} random Dense and Conv2D kernels at "
            "2:4, 1:2, 4:8, 1:4 and 3:4")
