"""The checkers of notebooks 01 and 02 (labkit/check/baseline.py, labkit/check/pruning.py).

Each checker must pass the solution, a second correct implementation written
differently, and labkit's own function; report a blank as "not attempted"; and reject
each typical mistake with its diagnosis.
"""
import math

import numpy as np
import pytest

import labkit.check.baseline as baseline_checks
import labkit.check.pruning as pruning_checks
import labkit.check.solutions as solutions
from labkit import check

ExerciseError = check.ExerciseError


def passes(checker, fn, capsys):
    checker(fn)
    out = capsys.readouterr().out
    assert out.startswith("✓"), out
    return out


def not_attempted(checker, capsys):
    def blank(*args, **kwargs):
        raise NotImplementedError

    def dots(*args, **kwargs):
        ...
        return ...
    for fn in (blank, dots):
        checker(fn)
        out = capsys.readouterr().out
        assert "not attempted" in out, out


def test_the_four_checkers_are_registered_with_their_notebooks():
    for name, notebook, module in [("conv_macs", "01", baseline_checks),
                                   ("latency_summary", "01", baseline_checks),
                                   ("magnitude_mask", "02", pruning_checks),
                                   ("m_by_n_mask", "02", pruning_checks)]:
        assert check.EXERCISES[name].notebook == notebook
        assert getattr(module, name).__name__ == name and hasattr(solutions, name)


# ----------------------------------------------------------------------------- conv_macs

def conv_macs_loops(height, width, kernel_size, in_channels, out_channels, stride=1,
                    padding="same"):
    """Walks the kernel over the (padded) image and adds up the taps:
    another way to the same count."""
    def padded(size):   # Keras's "same" pads just enough for ceil(size / stride) kernel positions
        if padding == "valid":
            return size
        return max((math.ceil(size / stride) - 1) * stride + kernel_size, size)
    macs = 0
    for _row in range(0, padded(height) - kernel_size + 1, stride):
        for _column in range(0, padded(width) - kernel_size + 1, stride):
            macs += kernel_size * kernel_size * in_channels * out_channels
    return macs


def conv_macs_labkit(height, width, kernel_size, in_channels, out_channels, stride=1,
                     padding="same"):
    """measure.layer_macs on a one-layer tf_keras model."""
    import tf_keras as keras

    from labkit import measure
    image = keras.Input((height, width, in_channels))
    conv = keras.layers.Conv2D(out_channels, kernel_size, strides=stride, padding=padding)
    return int(measure.layer_macs(keras.Model(image, conv(image)))["macs"].iloc[0])


@pytest.mark.parametrize("fn", [solutions.conv_macs, conv_macs_loops, conv_macs_labkit],
                         ids=["solution", "loops", "labkit"])
def test_conv_macs_accepts_correct_answers(fn, capsys):
    passes(baseline_checks.conv_macs, fn, capsys)


def test_conv_macs_accepts_a_numpy_integer_and_a_whole_float(capsys):
    passes(baseline_checks.conv_macs, lambda *a, **k: np.int64(solutions.conv_macs(*a, **k)),
           capsys)
    passes(baseline_checks.conv_macs, lambda *a, **k: float(solutions.conv_macs(*a, **k)), capsys)


def test_conv_macs_blank_is_not_attempted(capsys):
    not_attempted(baseline_checks.conv_macs, capsys)


def _out(size, k, stride, padding):
    return math.ceil(size / stride) if padding == "same" else (size - k) // stride + 1


CONV_MISTAKES = {
    "params, not MACs": (lambda h, w, k, ci, co, stride=1, padding="same": k * k * ci * co,
                         "parameters.*not the MACs"),
    "forgot in_channels": (lambda h, w, k, ci, co, stride=1, padding="same":
                           _out(h, k, stride, padding) * _out(w, k, stride, padding) * co * k * k,
                           "forgot in_channels"),
    "stride ignored": (lambda h, w, k, ci, co, stride=1, padding="same":
                       solutions.conv_macs(h, w, k, ci, co, 1, padding), "ignored the stride"),
    "valid off by one": (lambda h, w, k, ci, co, stride=1, padding="same":
                         solutions.conv_macs(h, w, k, ci, co, stride, padding)
                         if padding == "same" else
                         ((h - k) // stride) * ((w - k) // stride) * co * k * k * ci,
                         "'valid'.*off by one"),
    "valid as same": (lambda h, w, k, ci, co, stride=1, padding="same":
                      solutions.conv_macs(h, w, k, ci, co, stride, "same"),
                      "treated 'valid' like 'same'"),
    "same rounds down": (lambda h, w, k, ci, co, stride=1, padding="same":
                         solutions.conv_macs(h, w, k, ci, co, stride, padding)
                         if padding == "valid" else
                         (h // stride) * (w // stride) * co * k * k * ci, "rounds down"),
    "kernel counted once": (lambda h, w, k, ci, co, stride=1, padding="same":
                            _out(h, k, stride, padding) * _out(w, k, stride, padding) * co * k * ci,
                            "kernel_size once"),
    "FLOPs": (lambda *a, **kw: 2 * solutions.conv_macs(*a, **kw), "FLOPs, not MACs"),
    "bias counted": (lambda h, w, k, ci, co, stride=1, padding="same":
                     _out(h, k, stride, padding) * _out(w, k, stride, padding) * co
                     * (k * k * ci + 1), "bias add"),
    "wrong defaults": (lambda h, w, k, ci, co, stride=1, padding="valid":
                       solutions.conv_macs(h, w, k, ci, co, stride, padding), "defaults"),
    "returns a string": (lambda *a, **kw: str(solutions.conv_macs(*a, **kw)), "one whole number"),
    "off by a constant": (lambda *a, **kw: solutions.conv_macs(*a, **kw) + 7,
                          r"expected 225,792 MACs"),
}


@pytest.mark.parametrize("mistake", list(CONV_MISTAKES))
def test_conv_macs_diagnoses_typical_mistakes(mistake):
    fn, message = CONV_MISTAKES[mistake]
    with pytest.raises(ExerciseError, match=message):
        baseline_checks.conv_macs(fn)


def test_conv_macs_crash_names_the_inputs():
    def crashes(height, width, kernel_size, in_channels, out_channels, stride=1, padding="same"):
        return ({"same": 1}[padding] * height * width * kernel_size ** 2 * in_channels
                * out_channels // stride ** 2)
    with pytest.raises(ExerciseError,
                       match=r"KeyError.*\n  on \(28, 28, 5, 1, 6, stride=1, padding='valid'\)"):
        baseline_checks.conv_macs(crashes)


# ----------------------------------------------------------------------------- latency_summary

def latency_sorted(times_s, warmup):
    """Sorts and picks by rank with the nearest-rank method: another percentile NumPy accepts."""
    kept = sorted(t * 1e6 for t in list(times_s)[warmup:])
    def nearest_rank(q):
        return kept[max(math.ceil(q / 100 * len(kept)) - 1, 0)]
    return nearest_rank(50), nearest_rank(95)


def latency_labkit(times_s, warmup):
    from labkit.measure import Latency
    summary = Latency({"x": np.asarray(times_s)[warmup:] * 1e6}, {"x": ""}, {"x": 1},
                      machine={}).summary()
    return summary.loc["x", "latency_p50_us"], summary.loc["x", "latency_p95_us"]


@pytest.mark.parametrize("fn", [solutions.latency_summary, latency_sorted, latency_labkit,
                                lambda t, w: np.quantile(np.asarray(t[w:]) * 1e6,
                                                         [0.5, 0.95], method="hazen"),
                                lambda t, w: [float(np.median(np.asarray(t)[w:] * 1e6)),
                                              float(np.percentile(np.asarray(t)[w:], 95,
                                                                  method="higher") * 1e6)]],
                         ids=["solution", "nearest-rank", "labkit", "quantile-hazen",
                              "list-mixed-methods"])
def test_latency_summary_accepts_correct_answers(fn, capsys):
    passes(baseline_checks.latency_summary, fn, capsys)


def test_latency_summary_blank_is_not_attempted(capsys):
    not_attempted(baseline_checks.latency_summary, capsys)


def _kept_us(times, warmup):
    return np.asarray(times, dtype=float)[warmup:] * 1e6


LATENCY_MISTAKES = {
    "kept the warm-up": (lambda t, w: tuple(np.percentile(np.asarray(t) * 1e6, [50, 95])),
                         "kept the warm-up"),
    "dropped the last calls": (lambda t, w:
                               tuple(np.percentile(np.asarray(t)[:len(t) - w] * 1e6, [50, 95])),
                               "dropped the LAST"),
    "milliseconds": (lambda t, w: tuple(np.percentile(_kept_us(t, w) / 1e3, [50, 95])),
                     "milliseconds"),
    "seconds": (lambda t, w: tuple(np.percentile(np.asarray(t)[w:], [50, 95])), "in seconds"),
    "nanoseconds": (lambda t, w: tuple(np.percentile(np.asarray(t)[w:] * 1e9, [50, 95])),
                    "nanoseconds"),
    "mean, not median": (lambda t, w: (np.mean(_kept_us(t, w)), np.percentile(_kept_us(t, w), 95)),
                         "mean, not the median"),
    "swapped": (lambda t, w: tuple(np.percentile(_kept_us(t, w), [95, 50])), "swapped"),
    "fractions to percentile": (lambda t, w: tuple(np.percentile(_kept_us(t, w), [0.5, 0.95])),
                                "0 to 100"),
    "off by one": (lambda t, w: tuple(np.percentile(_kept_us(t, w + 1), [50, 95])), "off by one"),
    "one number": (lambda t, w: float(np.median(_kept_us(t, w))), "two numbers"),
    "wrong p95": (lambda t, w: (np.median(_kept_us(t, w)), np.max(_kept_us(t, w))),
                  "your p95 is wrong"),
}


@pytest.mark.parametrize("mistake", list(LATENCY_MISTAKES))
def test_latency_summary_diagnoses_typical_mistakes(mistake):
    fn, message = LATENCY_MISTAKES[mistake]
    with pytest.raises(ExerciseError, match=message):
        baseline_checks.latency_summary(fn)


# ----------------------------------------------------------------------------- magnitude_mask

def magnitude_threshold_keep_ties(weights, sparsity):
    """A threshold instead of a sort, ties at it KEPT (as tfmot does), .5
    rounded up, as a float 0/1 mask."""
    w = np.abs(np.asarray(weights))
    count = int(np.floor(sparsity * w.size + 0.5))
    if count == 0:
        return np.ones(w.shape, np.float32)
    if count >= w.size:
        return np.zeros(w.shape, np.float32)
    return (w >= np.sort(w, axis=None)[count]).astype(np.float32)


def magnitude_prune_ties(weights, sparsity):
    """Ties at the threshold all PRUNED, returned as a list of lists of ints (or one list)."""
    w = np.abs(np.asarray(weights, dtype=np.float32))
    count = round(sparsity * w.size)
    if count == 0:
        return np.ones(w.shape, int).tolist()
    threshold = np.partition(w.ravel(), count - 1)[count - 1]
    return (w > threshold).astype(int).tolist()


def magnitude_labkit(weights, sparsity):
    from labkit import pruning
    return pruning.magnitude_mask(weights, sparsity)


@pytest.mark.parametrize("fn", [solutions.magnitude_mask, magnitude_threshold_keep_ties,
                                magnitude_prune_ties, magnitude_labkit],
                         ids=["solution", "keep-ties", "prune-ties", "labkit"])
def test_magnitude_mask_accepts_correct_answers(fn, capsys):
    passes(pruning_checks.magnitude_mask, fn, capsys)


def test_magnitude_mask_rule_accepts_both_neighbours_at_half_and_ties_either_way():
    w = np.array([0.3, -0.1, 0.2, 0.8, -0.5])     # 0.5 * 5 = 2.5
    assert pruning_checks.mask_is_right(w, 0.5, np.array([1, 0, 0, 1, 1], bool))       # 2 pruned
    assert pruning_checks.mask_is_right(w, 0.5, np.array([0, 0, 0, 1, 1], bool))       # 3 pruned
    # 0.3 pruned, 0.2 kept
    assert not pruning_checks.mask_is_right(w, 0.5, np.array([0, 0, 1, 1, 1], bool))
    assert not pruning_checks.mask_is_right(w, 0.5, np.array([1, 0, 1, 1, 1], bool))   # 1 pruned
    ties = np.array([1.0, -1.0, 1.0, 1.0, 2.0, -3.0])
    for pruned in range(5):   # any number of the four tied |w| = 1 may go
        kept = np.ones(6, bool)
        kept[:pruned] = False
        assert pruning_checks.mask_is_right(ties, 0.5, kept), pruned
    assert not pruning_checks.mask_is_right(ties, 0.5, np.array([1, 1, 1, 1, 0, 1], bool))


def test_magnitude_mask_blank_is_not_attempted(capsys):
    not_attempted(pruning_checks.magnitude_mask, capsys)


def _count(w, s):
    return int(round(s * np.size(w)))


def _keep_by(order_values, count):
    """Bool mask zeroing the `count` entries with the smallest `order_values`."""
    flat = np.ones(np.size(order_values), bool)
    flat[np.argsort(np.ravel(order_values), kind="stable")[:count]] = False
    return flat.reshape(np.shape(order_values))


MAGNITUDE_MISTAKES = {
    "kept the smallest": (lambda w, s: _keep_by(-np.abs(w), _count(w, s)), "kept the smallest"),
    "signed values": (lambda w, s: _keep_by(w, _count(w, s)), "signed values"),
    "inverted": (lambda w, s: ~solutions.magnitude_mask(w, s), "inverted"),
    "flattened": (lambda w, s: solutions.magnitude_mask(w, s).ravel(), r"wrong shape.*reshape"),
    "kept fraction": (lambda w, s: _keep_by(np.abs(w), round((1 - s) * np.size(w))),
                      "fraction set to ZERO"),
    "floor": (lambda w, s: _keep_by(np.abs(w), int(s * np.size(w))), "rounded down"),
    "pruned weights returned": (lambda w, s: w * solutions.magnitude_mask(w, s), "pruned weights"),
    "off by one": (lambda w, s: _keep_by(np.abs(w), _count(w, s) + 1), r"off by one"),
    "everything at sparsity 0": (lambda w, s:
                                 np.abs(w) > np.sort(np.abs(w), axis=None)[_count(w, s) - 1],
                                 "pruned every weight"),
    "random": (lambda w, s: np.random.default_rng(0)
               .permutation(solutions.magnitude_mask(w, s).ravel()).reshape(np.shape(w)),
               "not the smallest"),
}


@pytest.mark.parametrize("mistake", list(MAGNITUDE_MISTAKES))
def test_magnitude_mask_diagnoses_typical_mistakes(mistake):
    fn, message = MAGNITUDE_MISTAKES[mistake]
    with pytest.raises(ExerciseError, match=message):
        pruning_checks.magnitude_mask(fn)


def test_magnitude_mask_is_also_run_on_the_tfmot_layer():
    """A mask wrong only on the layer compared with tfmot's mask (12 x 5) is caught there."""
    def not_tfmots(weights, sparsity):
        mask = solutions.magnitude_mask(weights, sparsity)
        if np.shape(weights) == (12, 5):
            mask = mask.copy()
            mask.flat[0] = ~mask.flat[0]
        return mask
    with pytest.raises(ExerciseError, match=r"an array of shape \(12, 5\) \(float32\), 0.7\)"):
        pruning_checks.magnitude_mask(not_tfmots)


def test_checkers_leave_the_notebooks_random_numbers_alone(capsys):
    """Building the checkers' tiny Keras models must not draw from the seed
    generator set by labkit.setup."""
    from tf_keras.src import backend
    generator = backend._SEED_GENERATOR.generator
    before, numpy_before = generator.getstate(), np.random.get_state()[1].copy()
    baseline_checks.conv_macs(solutions.conv_macs)
    pruning_checks.magnitude_mask(solutions.magnitude_mask)
    assert generator.getstate() == before
    assert np.array_equal(np.random.get_state()[1], numpy_before)


# ----------------------------------------------------------------------------- m_by_n_mask

def m_by_n_loops(kernel, m=2, n=4):
    """Loops over every column of inputs and every group, float 0/1 mask, ties
    broken towards the later weight."""
    kernel = np.asarray(kernel)
    mask = np.zeros(kernel.shape, np.float32)
    # (..., output): one column of inputs
    for index in np.ndindex(*kernel.shape[:-2], kernel.shape[-1]):
        *lead, out = index
        column = np.abs(kernel[(*lead, slice(None), out)])
        for start in range(0, len(column), n):
            group = column[start:start + n]
            for i in sorted(range(n), key=lambda j: (group[j], j), reverse=True)[:n - m]:
                mask[(*lead, start + i, out)] = 1.0
    return mask


def m_by_n_zero_smallest(kernel, m=2, n=4):
    """Zero the m smallest of every n, by a partial sort."""
    moved = np.moveaxis(np.abs(kernel), -2, -1)
    groups = moved.reshape(-1, n)
    zero = np.argpartition(groups, m - 1, axis=1)[:, :m]
    keep = np.ones_like(groups, dtype=bool)
    np.put_along_axis(keep, zero, False, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), -1, -2)


def m_by_n_tfmot(kernel, m=2, n=4):
    """tfmot's own m:n mask, as sparsity_m_by_n computes it inside
    pruning.prune (m zeros in every n)."""
    import tensorflow as tf
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_utils
    weights = tf.constant(np.asarray(kernel, np.float32))
    mask = pruning_utils.generate_m_by_n_mask(pruning_utils.weights_rearrange(weights), (m, n))
    return pruning_utils.m_by_n_sparsity_mask_prepare(mask, weights.shape).numpy()


def m_by_n_int8(kernel, m=2, n=4):
    return solutions.m_by_n_mask(np.asarray(kernel, np.float64), m, n).astype(np.int8)


@pytest.mark.parametrize("fn", [solutions.m_by_n_mask, m_by_n_loops, m_by_n_zero_smallest,
                                m_by_n_tfmot, m_by_n_int8],
                         ids=["solution", "loops", "zero-smallest", "tfmot", "int8"])
def test_m_by_n_mask_accepts_correct_answers(fn, capsys):
    passes(pruning_checks.m_by_n_mask, fn, capsys)


def test_m_by_n_mask_blank_is_not_attempted(capsys):
    not_attempted(pruning_checks.m_by_n_mask, capsys)


def _keep_along(kernel, m, n, axis, key=np.abs):
    moved = np.moveaxis(key(np.asarray(kernel, np.float64)), axis, -1)
    groups = moved.reshape(-1, n)
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, np.argsort(-groups, axis=1, kind="stable")[:, :m], True, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


M_BY_N_MISTAKES = {
    "output axis": (lambda k, m=2, n=4: _keep_along(k, m, n, -1), "OUTPUT axis"),
    "flattened as stored": (lambda k, m=2, n=4: _keep_along(np.asarray(k).reshape(-1, n), m, n, -1)
                            .reshape(np.shape(k)), "OUTPUT axis"),
    "axis 0": (lambda k, m=2, n=4: _keep_along(k, m, n, 0), "axis 0"),
    "kept the smallest": (lambda k, m=2, n=4: _keep_along(k, m, n, -2, key=lambda a: -np.abs(a)),
                          "SMALLEST"),
    "inverted": (lambda k, m=2, n=4: ~solutions.m_by_n_mask(k, m, n), "SMALLEST.*inverted"),
    "signed": (lambda k, m=2, n=4: _keep_along(k, m, n, -2, key=lambda a: a), "signed values"),
    "hard-coded 2:4": (lambda k, m=2, n=4: solutions.m_by_n_mask(k, 2, 4)
                       if np.shape(k)[-2] % 4 == 0 else solutions.m_by_n_mask(k, m, n),
                       "ignore the arguments m and n"),
    "kept m + 1": (lambda k, m=2, n=4: _keep_along(k, m + 1, n, -2),
                   r"keep exactly 2 weights; your groups keep \[3\]"),
    "wrong shape": (lambda k, m=2, n=4: solutions.m_by_n_mask(k, m, n).ravel(), "wrong shape"),
    "kept m instead of zeroing m": (lambda k, m=2, n=4: solutions.m_by_n_mask(k, n - m, n),
                                    "m is the number of ZEROS"),
    "random": (lambda k, m=2, n=4: np.random.default_rng(0).permuted(
        np.moveaxis(solutions.m_by_n_mask(k, m, n), -2, -1).reshape(-1, n), axis=1).reshape(
        np.moveaxis(np.asarray(k), -2, -1).shape).swapaxes(-1, -2), "do not keep their 2 largest"),
}


@pytest.mark.parametrize("mistake", list(M_BY_N_MISTAKES))
def test_m_by_n_mask_diagnoses_typical_mistakes(mistake):
    fn, message = M_BY_N_MISTAKES[mistake]
    with pytest.raises(ExerciseError, match=message):
        pruning_checks.m_by_n_mask(fn)


def test_m_by_n_mask_wrong_defaults():
    def defaults_1_of_4(kernel, m=1, n=4):
        return solutions.m_by_n_mask(kernel, m, n)
    with pytest.raises(ExerciseError, match="defaults"):
        pruning_checks.m_by_n_mask(defaults_1_of_4)
