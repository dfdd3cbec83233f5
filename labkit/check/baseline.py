"""Checkers for the baseline's exercises: the MACs of one convolution, and a latency summary.

conv_macs is judged against `measure.layer_macs` on one-layer tf_keras models (built inside the
checker, with zero initializers so that no random number of the notebook's is drawn);
latency_summary against NumPy's percentiles, any of its methods, as
`measure.Latency.summary` reports them.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from labkit.check import exercise, fail

US_PER_S = 1_000_000


# ----------------------------------------------------------------------------- conv_macs

def _out_size(size: int, kernel_size: int, stride: int, padding: str) -> int:
    if padding == "same":
        return math.ceil(size / stride)
    return (size - kernel_size) // stride + 1


def _macs(h, w, k, c_in, c_out, stride, padding) -> int:
    positions = _out_size(h, k, stride, padding) * _out_size(w, k, stride, padding)
    return positions * c_out * k * k * c_in


def _keras_macs(h, w, k, c_in, c_out, stride, padding) -> int:
    """measure.layer_macs on a one-Conv2D tf_keras model: the book's own count."""
    # imported here: labkit.check itself loads without TensorFlow
    import tf_keras as keras

    from labkit import measure
    image = keras.Input((h, w, c_in), name="image")
    conv = keras.layers.Conv2D(c_out, k, strides=stride, padding=padding,
                               kernel_initializer="zeros", name="conv")
    table = measure.layer_macs(keras.Model(image, conv(image), name="one_conv"))
    return int(table["macs"].iloc[0])


# (message, what the mistake returns); tried in this order on the first case that fails
_CONV_MISTAKES = [
    ("you counted the weights (parameters), not the MACs: every weight is used once per output "
     "position, so multiply by out_height * out_width",
     lambda h, w, k, ci, co, s, p: k * k * ci * co),
    ("you counted the weights plus biases (parameters), not the MACs: multiply the kernel's "
     "k*k*in_channels*out_channels by the out_height * out_width output positions",
     lambda h, w, k, ci, co, s, p: (k * k * ci + 1) * co),
    ("you forgot in_channels: each output value sums over kernel_size * "
     "kernel_size * in_channels products",
     lambda h, w, k, ci, co, s, p: _out_size(h, k, s, p) * _out_size(w, k, s, p) * co * k * k),
    ("you forgot out_channels: each of the out_channels filters produces its own output map",
     lambda h, w, k, ci, co, s, p: _out_size(h, k, s, p) * _out_size(w, k, s, p) * k * k * ci),
    ("you used kernel_size once: a kernel_size x kernel_size kernel has kernel_size**2 taps",
     lambda h, w, k, ci, co, s, p: _out_size(h, k, s, p) * _out_size(w, k, s, p) * co * k * ci),
    ("you ignored the stride: with stride s the output has about 1/s of the "
     "positions in each direction",
     lambda h, w, k, ci, co, s, p: _macs(h, w, k, ci, co, 1, p)),
    ("you divided by the stride only once: the stride shrinks the height AND the width",
     lambda h, w, k, ci, co, s, p: _out_size(h, k, s, p) * _out_size(w, k, 1, p) * co * k * k * ci),
    ("your 'valid' output size is off by one: a kernel of size k fits (size "
     "- k) // stride + 1 times",
     lambda h, w, k, ci, co, s, p: None if p != "valid" else
     ((h - k) // s) * ((w - k) // s) * co * k * k * ci),
    ("your 'valid' output size is off by one: a kernel of size k fits (size - k) // stride + 1 "
     "times, not (size - k + 1) // stride",
     lambda h, w, k, ci, co, s, p: None if p != "valid" else
     ((h - k + 1) // s) * ((w - k + 1) // s) * co * k * k * ci),
    ("you treated 'valid' like 'same': 'valid' adds no padding, so the output loses kernel_size - "
     "1 rows and columns before striding",
     lambda h, w, k, ci, co, s, p: None if p != "valid" else _macs(h, w, k, ci, co, s, "same")),
    ("your 'same' output size rounds down: 'same' gives ceil(size / stride) rows (math.ceil, or "
     "(size + stride - 1) // stride), not size // stride",
     lambda h, w, k, ci, co, s, p: None if p != "same" else (h // s) * (w // s) * co * k * k * ci),
    ("you treated 'same' like 'valid': 'same' pads the input so that the output has ceil(size / "
     "stride) rows and columns",
     lambda h, w, k, ci, co, s, p: None if p != "same" else _macs(h, w, k, ci, co, s, "valid")),
    ("you counted FLOPs, not MACs: one multiply-accumulate is one MAC (FLOP counters count 2)",
     lambda h, w, k, ci, co, s, p: 2 * _macs(h, w, k, ci, co, s, p)),
    ("you counted a bias add per output value: a MAC is one multiply-accumulate per kernel tap and "
     "input channel; measure.layer_macs does not count the bias",
     lambda h, w, k, ci, co, s, p:
     _out_size(h, k, s, p) * _out_size(w, k, s, p) * co * (k * k * ci + 1)),
    ("you swapped height and width somewhere, or used height twice: the output has "
     "out_height * out_width positions",
     lambda h, w, k, ci, co, s, p: _out_size(h, k, s, p) ** 2 * co * k * k * ci),
]

# (height, width, kernel_size, in_channels, out_channels, stride, padding): worked by hand
_CONV_BY_HAND = [
    # the baseline's conv1: 28*28 positions * 32 filters * 3*3*1 taps
    (28, 28, 3, 1, 32, 1, "same"),
    (14, 14, 3, 32, 64, 1, "same"),    # conv2, as the baseline chapter asserts
    (28, 28, 5, 1, 6, 1, "valid"),     # LeNet's first layer: 24x24 outputs
    (7, 7, 3, 4, 8, 2, "same"),        # ceil(7 / 2) = 4
    (27, 27, 3, 2, 4, 2, "valid"),     # (27 - 3) // 2 + 1 = 13
    (10, 6, 3, 3, 5, 1, "valid"),      # not square: 8 x 4 outputs
    (9, 12, 1, 16, 8, 3, "same"),      # a 1x1 convolution, stride 3: 3 x 4 outputs
]


def _as_count(result):
    """The learner's count as an int, or None when it is not a whole number."""
    if isinstance(result, np.ndarray) and result.size == 1:
        result = result.item()
    if isinstance(result, bool) or not isinstance(result, numbers.Real):
        return None
    value = float(result)
    return int(value) if math.isfinite(value) and value.is_integer() else None


def _judge_conv(call, case, expected):
    h, w, k, c_in, c_out, stride, padding = case
    result = call(h, w, k, c_in, c_out, stride=stride, padding=padding)
    args, kwargs = (h, w, k, c_in, c_out), {"stride": stride, "padding": padding}
    got = _as_count(result)
    if got is None:
        fail("conv_macs", f"return one whole number (an int), got {result!r} "
                          f"({type(result).__name__})",
             args, kwargs)
    if got == expected:
        return
    for message, mistake in _CONV_MISTAKES:
        value = mistake(h, w, k, c_in, c_out, stride, padding)
        if value is not None and value != expected and value == got:
            fail("conv_macs", f"{message}. Expected {expected:,}, got {got:,}.", args, kwargs)
    out_h, out_w = _out_size(h, k, stride, padding), _out_size(w, k, stride, padding)
    fail("conv_macs", f"expected {expected:,} MACs ({out_h} x {out_w} output "
                      f"positions x {c_out} filters x {k}x{k} taps x {c_in} input "
                      f"channels), got {got:,}.", args, kwargs)


@exercise("conv_macs", "01", "measure.layer_macs",
          'conv_macs(height, width, kernel_size, in_channels, out_channels, '
          'stride=1, padding="same") -> int')
def conv_macs(call):
    """Multiply-accumulates of one Conv2D on one image: 7 cases worked by hand, then 24 random ones,
    each compared with measure.layer_macs on a one-layer tf_keras model."""
    default = call(28, 28, 3, 1, 32)   # stride=1, padding="same" by default
    if _as_count(default) != 28 * 28 * 32 * 3 * 3 * 1:
        explicit = _as_count(call(28, 28, 3, 1, 32, stride=1, padding="same"))
        if explicit == 28 * 28 * 32 * 3 * 3 * 1:
            fail("conv_macs", "with stride=1 and padding='same' given you are right, but called "
                              f"with the defaults you return {default}: keep the defaults "
                              "stride=1, padding=\"same\"",
                 (28, 28, 3, 1, 32))
    for case in _CONV_BY_HAND:
        _judge_conv(call, case, _macs(*case))
    rng = np.random.default_rng(101)
    cases = 24
    for _ in range(cases):
        k = int(rng.choice([1, 2, 3, 5, 7]))
        stride = int(rng.choice([1, 1, 2, 3]))
        padding = str(rng.choice(["same", "valid"]))
        h, w = (int(v) for v in rng.integers(k, 33, size=2))
        c_in, c_out = (int(v) for v in rng.integers(1, 17, size=2))
        case = (h, w, k, c_in, c_out, stride, padding)
        _judge_conv(call, case, _keras_macs(*case))
    return f"{len(_CONV_BY_HAND)} cases by hand, {cases} random ones against measure.layer_macs"


# ----------------------------------------------------------------------------- latency_summary

PERCENTILE_METHODS = ("inverted_cdf", "averaged_inverted_cdf", "closest_observation",
                      "interpolated_inverted_cdf",
                      "hazen", "weibull", "linear", "median_unbiased", "normal_unbiased",
                      "lower", "higher", "midpoint", "nearest")


def _percentiles(values, q) -> np.ndarray:
    """The q-th percentile of `values` by every method NumPy knows:
    any of them is a right answer."""
    return np.array([np.percentile(values, q, method=m) for m in PERCENTILE_METHODS])


def _matches(got: float, candidates) -> bool:
    return bool(np.any(np.isclose(got, np.asarray(candidates, dtype=float), rtol=1e-6, atol=1e-9)))


def _latency_mistakes(times, warmup):
    """(message, the p50s the mistake would give, the p95s it would give): any percentile method."""
    kept_us = times[warmup:] * US_PER_S
    everything_us = times * US_PER_S
    return [
        ("you swapped the two: return (p50, p95), the median first",
         _percentiles(kept_us, 95), _percentiles(kept_us, 50)),
        ("you kept the warm-up calls: drop the first `warmup` times "
         "(times_s[warmup:]) before the percentiles",
         _percentiles(everything_us, 50), _percentiles(everything_us, 95)),
        ("you dropped the LAST `warmup` calls: the warm-up calls are the first "
         "ones (times_s[warmup:])",
         _percentiles(times[:len(times) - warmup] * US_PER_S, 50),
         _percentiles(times[:len(times) - warmup] * US_PER_S, 95)),
        ("you kept only the warm-up calls: times_s[:warmup] is the warm-up, "
         "times_s[warmup:] what to summarise",
         _percentiles(times[:warmup] * US_PER_S, 50) if warmup else [np.nan],
         _percentiles(times[:warmup] * US_PER_S, 95) if warmup else [np.nan]),
        ("your p50 is the mean, not the median: the median is the 50th percentile, and a few "
         "slow calls pull the mean up",
         [np.mean(kept_us)], _percentiles(kept_us, 95)),
        ("your p50 is the mean, not the median, and the warm-up calls are still "
         "in: drop times_s[:warmup]",
         [np.mean(everything_us)], _percentiles(everything_us, 95)),
        ("your warm-up count is off by one: drop exactly the first `warmup` "
         "calls, times_s[warmup:]",
         np.r_[_percentiles(times[warmup + 1:] * US_PER_S, 50),
               _percentiles(times[max(warmup - 1, 0):] * US_PER_S, 50)],
         np.r_[_percentiles(times[warmup + 1:] * US_PER_S, 95),
               _percentiles(times[max(warmup - 1, 0):] * US_PER_S, 95)]),
        ("your numbers are in seconds: multiply by 1,000,000 for microseconds",
         _percentiles(kept_us, 50) / US_PER_S, _percentiles(kept_us, 95) / US_PER_S),
        ("your numbers are in milliseconds: 1 s = 1,000 ms = 1,000,000 µs",
         _percentiles(kept_us, 50) / 1e3, _percentiles(kept_us, 95) / 1e3),
        ("your numbers are in nanoseconds: 1 s = 1,000,000 µs (multiply by 1e6, not 1e9)",
         _percentiles(kept_us, 50) * 1e3, _percentiles(kept_us, 95) * 1e3),
        ("np.percentile takes percents from 0 to 100 (np.quantile takes 0 to 1): you asked for the "
         "0.5th and 0.95th percentiles, nearly the minimum",
         _percentiles(kept_us, 0.5), _percentiles(kept_us, 0.95)),
    ]


def _judge_latency(call, times, warmup, given=None):
    times = np.asarray(times, dtype=float)
    result = call(times.tolist() if given == "list" else times.copy(), warmup)
    args = (times, warmup)
    try:
        values = np.asarray(result, dtype=float).ravel()
    except (TypeError, ValueError):
        values = None
    if values is None or values.size != 2:
        fail("latency_summary", f"return two numbers, (p50_us, p95_us); got {result!r}", args)
    p50, p95 = (float(v) for v in values)
    kept_us = times[warmup:] * US_PER_S
    right50, right95 = _matches(p50, _percentiles(kept_us, 50)), _matches(p95,
                                                                          _percentiles(kept_us, 95))
    if right50 and right95:
        return
    for message, mistake50, mistake95 in _latency_mistakes(times, warmup):
        if _matches(p50, mistake50) and _matches(p95, mistake95):
            fail("latency_summary", f"{message}. Expected about ({np.percentile(kept_us, 50):.6g}, "
                                    f"{np.percentile(kept_us, 95):.6g}) µs, got "
                                    f"({p50:.6g}, {p95:.6g}).", args)
    which = "p50" if not right50 else "p95"
    fail("latency_summary", f"your {which} is wrong: after dropping the first {warmup} calls, "
                            f"expected ({np.percentile(kept_us, 50):.6g}, "
                            f"{np.percentile(kept_us, 95):.6g}) µs (np.percentile, any method), "
                            f"got ({p50:.6g}, {p95:.6g}).", args)


# (times in seconds, warmup): the first calls are slow, as real warm-up calls are
_LATENCY_BY_HAND = [
    ([0.050, 0.020, 0.001, 0.002, 0.003, 0.004, 0.015], 2),   # median of 1, 2, 3, 4, 15 ms: 3000 µs
    ([0.9, 100e-6, 300e-6, 200e-6], 1),   # median of 100, 300, 200 µs = 200
    ([1e-3] * 5 + [2e-3] * 14 + [40e-3], 0),   # no warm-up; one slow call
]


@exercise("latency_summary", "01", "measure.Latency.summary",
          "latency_summary(times_s, warmup) -> (p50_us, p95_us)")
def latency_summary(call):
    """Drop the warm-up calls, convert seconds to microseconds, take the median and
    the 95th percentile: 3 cases by hand, then random ones (as lists and as arrays)
    against np.percentile, any method."""
    for times, warmup in _LATENCY_BY_HAND:
        _judge_latency(call, times, warmup)
    rng = np.random.default_rng(102)
    cases = 20
    for i in range(cases):
        calls = int(rng.integers(20, 300))
        warmup = int(rng.integers(0, 15))
        times = rng.lognormal(np.log(200e-6), 0.3, calls)         # about 200 µs a call, a slow tail
        times[:warmup] *= rng.uniform(5, 50, warmup)               # warm-up calls are slower
        _judge_latency(call, times, warmup, given="list" if i % 2 else None)
    return f"{len(_LATENCY_BY_HAND)} cases by hand, {cases} random ones against np.percentile"

