"""Checkers for quantization's exercises: affine parameters, and an integer-only dense layer.

affine_params is judged against `quantizers.affine_params`. int8_dense is judged on cases worked by
hand, on random ones against the integer arithmetic written out below, and against LiteRT running
a tiny Dense model that `quantization.converter` made into a full-integer int8 .tflite: the scales,
zero points, int8 weights and int32 biases are read from that file (`tflite.weights`), and the
interpreter's int8 outputs must match the learner's to within one code (LiteRT requantizes in
fixed point and may round the other way). TensorFlow is imported only when int8_dense runs.
"""
from __future__ import annotations

import functools
import math
import numbers
import tempfile
from pathlib import Path

import numpy as np

import labkit
from labkit import quantizers
from labkit.check import ExerciseError, exercise, fail

# a value this close to k + 0.5 may round either way (float32 scales, fixed-point multipliers)
TIE = 1e-3


# ----------------------------------------------------------------------------- affine_params

def _qrange(bits: int) -> tuple[int, int]:
    return -2 ** (bits - 1), 2 ** (bits - 1) - 1


def _number(value):
    """A float from a Python or NumPy number or a one-element array; None otherwise."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


_AFFINE_BY_HAND = [  # (x, bits)
    ([-1.0, 0.0, 1.0, 2.0], 8),                       # scale 3 / 255, zero point -128 + 85 = -43
    ([0.5, 1.0, 2.55], 8),   # widened to [0, 2.55]: scale 0.01, zero point -128
    ([-0.9, -0.31, 0.0, 0.2, 0.55, 1.7], 4),   # the chapter's example: 2.6 / 15, zero point -3
    ([-2.0, -1.0], 8),                                # widened to [-2, 0]: zero point 127
    ([[-0.5, 0.25], [0.75, 1.0]], 2),   # a 2-D tensor, codes -2..1: scale 0.5, zero point -1
]


def _affine_mistakes(x: np.ndarray, bits: int, scale: float, zero_point: int):
    """(message, scale or None, zero point or None) that a typical
    mistake gives; None means 'any'."""
    qmin, qmax = _qrange(bits)
    lo, hi = float(np.min(x)), float(np.max(x))
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    peak = max(-lo0, hi0)
    raw_zero = qmin - lo0 / scale
    out = [
        ("your range is [min(x), max(x)]: widen it to include 0 (lo = min(min(x), 0), "
         "hi = max(max(x), 0)), so that a real 0 has an exact "
         "code", (hi - lo) / (qmax - qmin) if (lo > 0 or hi < 0) and hi > lo else None,
         None),
        ("you divided the range by 2**bits: 2**bits codes have 2**bits - 1 steps between them, so "
         "scale = (hi - lo) / (2**bits - 1)", (hi0 - lo0) / 2 ** bits, None),
        ("you divided the range by 2**(bits - 1) - 1 (the symmetric step): the affine grid spreads "
         "all 2**bits - 1 steps over [lo, hi]", (hi0 - lo0) / qmax if bits > 1 else None, None),
        ("symmetric, not asymmetric: zero point 0 and scale max|x| / (2**(bits-1) - 1) "
         "is how TFLite stores weights; here the codes span [lo, hi] and the zero "
         "point moves with the data",
         peak / qmax if bits > 1 else None, 0),
        ("symmetric, not asymmetric: your zero point is 0 and your scale "
         "covers [-max|x|, max|x|]; the affine grid spans [lo, hi] and its "
         "zero point moves with the data", 2 * peak / (qmax - qmin), 0),
        ("you used 8 bits whatever `bits` says: qmin = -2**(bits-1), qmax = 2**(bits-1) - 1",
         (hi0 - lo0) / 255 if bits != 8 else None, None),
        ("unsigned codes: your zero point is for codes [0, 2**bits - 1]; TFLite's "
         f"int8 codes are signed, [{qmin}, {qmax}], so subtract 2**(bits-1) (zero "
         "point = qmin - lo / scale)", scale,
         zero_point - qmin),
        ("the sign of lo / scale is wrong: zero point = qmin - lo / scale (lo <= "
         "0, so it lies above qmin)",
         scale, int(np.clip(np.round(qmin + lo0 / scale), qmin, qmax))),
        ("the sign of lo / scale is wrong: zero point = qmin - lo / scale (lo <= "
         "0, so it lies above qmin)",
         scale, int(np.round(qmin + lo0 / scale))),
        ("your zero point is qmax - lo / scale: the lowest real value lo gets the lowest code "
         "qmin, so zero point = qmin - lo / scale", scale, int(np.round(qmax - lo0 / scale))),
        ("your zero point is rounded down (floor, or int() of a positive number): round "
         "it to the nearest integer",
         scale, math.floor(raw_zero) if abs(raw_zero - round(raw_zero)) > TIE else None),
        ("your zero point is rounded up (ceil, or int() of a negative number, which cuts toward "
         "zero): round it to the nearest "
         "integer", scale, math.ceil(raw_zero) if abs(raw_zero - round(raw_zero)) > TIE else None),
    ]
    return out


def _judge_affine(call, x: np.ndarray, bits: int) -> None:
    result = call(x.copy(), bits)
    args = (x, bits)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        length = f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""
        fail("affine_params", "return two numbers, (scale, zero_point); got "
                              f"{type(result).__name__}{length}", args)
    got_scale, got_zero = _number(result[0]), _number(result[1])
    if got_scale is None or got_zero is None:
        fail("affine_params", "scale and zero_point should each be one number, got "
                              f"{result[0]!r} and {result[1]!r}", args)
    p = quantizers.affine_params(x, bits)
    qmin, qmax = p.qmin, p.qmax
    scale = float(p.scale)
    lo0, hi0 = min(float(np.min(x)), 0.0), max(float(np.max(x)), 0.0)
    raw_zero = qmin - lo0 / ((hi0 - lo0) / (qmax - qmin))
    zeros = {int(p.zero_point)}
    # halfway between two codes, either is right; float32 arithmetic blurs "halfway" more at 16 bits
    if abs(raw_zero - math.floor(raw_zero) - 0.5) < max(TIE, 1e-6 * (qmax - qmin)):
        zeros = {math.floor(raw_zero), math.ceil(raw_zero)}
    if math.isclose(got_scale, scale, rel_tol=1e-5) and got_zero in zeros:
        return
    if got_scale.is_integer() and math.isclose(got_zero, scale, rel_tol=1e-5):
        fail("affine_params", "you returned (zero_point, scale): return (scale, "
                              "zero_point), the scale first", args)
    if not got_zero.is_integer():
        if math.isclose(got_zero, raw_zero, rel_tol=1e-5, abs_tol=1e-6):
            fail("affine_params", f"your zero point {got_zero:.6g} is not rounded: it "
                                  "is a code, so round it to the nearest integer (and "
                                  "clip it to the code range)", args)
        fail("affine_params", f"the zero point is an integer code, got {got_zero!r}", args)
    for message, m_scale, m_zero in _affine_mistakes(x, bits, scale, int(p.zero_point)):
        scale_fits = m_scale is None or math.isclose(got_scale, m_scale, rel_tol=1e-5)
        zero_fits = m_zero is None or got_zero == m_zero
        differs = not ((m_scale is None or math.isclose(m_scale, scale, rel_tol=1e-5))
                       and (m_zero is None or m_zero in zeros))
        if scale_fits and zero_fits and differs and (m_scale is not None or m_zero is not None):
            fail("affine_params", f"{message}. Expected scale {scale:.6g} and zero point "
                                  f"{p.zero_point}, got {got_scale:.6g} and {got_zero:g}.", args)
    if not qmin <= got_zero <= qmax:
        fail("affine_params", f"your zero point {got_zero:g} lies outside the code range [{qmin}, "
                              f"{qmax}] for {bits} bits: it must be a code itself (clip it)", args)
    fail("affine_params", f"expected scale {scale:.6g} = ({hi0:.6g} - {lo0:.6g}) / ({qmax} - "
                          f"{qmin}) and zero point {p.zero_point} = round({qmin} - {lo0:.6g} / "
                          f"scale); got {got_scale:.6g} and {got_zero:g}", args)


@exercise("affine_params", "04", "quantizers.affine_params", "affine_params(x, bits) -> "
                                                             "(scale, zero_point)")
def affine_params(call):
    """Asymmetric per-tensor parameters for signed codes: 5 cases by hand, then 40 random ones (any
    shape, 2 to 8 and 16 bits, data on both sides of 0 or on one)
    against quantizers.affine_params."""
    for x, bits in _AFFINE_BY_HAND:
        _judge_affine(call, np.array(x, np.float32), bits)
    rng = np.random.default_rng(404)
    cases = 40
    for _ in range(cases):
        shape = [(int(rng.integers(2, 50)),), (int(rng.integers(1, 8)), int(rng.integers(2, 9))),
                 (3, 3, int(rng.integers(1, 4)), 4)][int(rng.integers(3))]
        x = rng.normal(float(rng.choice([0.0, 0.0, 3.0, -3.0])),
                       float(rng.choice([0.01, 1.0, 50.0])), shape)
        bits = int(rng.choice([2, 3, 4, 5, 6, 7, 8, 8, 8, 16]))
        _judge_affine(call, x.astype(np.float32), bits)
    return (f"{len(_AFFINE_BY_HAND)} cases by hand, {cases} random ones against "
            "quantizers.affine_params")


# ----------------------------------------------------------------------------- int8_dense

def exact_output(x_q, x_zero_point, w_q, w_scale, b_q, x_scale, y_scale) -> np.ndarray:
    """The real value y_q - y_zero_point stands for before rounding: int64
    accumulator x real multiplier."""
    x, w, b = np.asarray(x_q, np.int64), np.asarray(w_q, np.int64), np.asarray(b_q, np.int64)
    accumulator = (x - int(x_zero_point)) @ w + b
    return accumulator * (float(x_scale) * np.asarray(w_scale, np.float64) / float(y_scale))


def reference_dense(x_q, x_scale, x_zero_point, w_q, w_scale, b_q, y_scale,
                    y_zero_point) -> np.ndarray:
    """The integer-only dense layer, written out: int32 accumulation, requantization, clamping."""
    real = exact_output(x_q, x_zero_point, w_q, w_scale, b_q, x_scale, y_scale)
    return np.clip(np.round(real) + int(y_zero_point), -128, 127).astype(np.int8)


def _requantize(accumulator, multiplier, y_zero_point, rounding=np.round, clip=True) -> np.ndarray:
    y = rounding(np.asarray(accumulator, np.float64) * multiplier) + y_zero_point
    return np.clip(y, -128, 127) if clip else y


def _wrapping(values, dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    span = int(info.max) - int(info.min) + 1
    return (np.asarray(values, np.int64) - info.min) % span + info.min


def _dense_mistakes(x_q, x_scale, x_zp, w_q, w_scale, b_q, y_scale, y_zp):
    """(message, the output that mistake gives) for the typical mistakes, in the order tried."""
    x64, w64, b64 = np.asarray(x_q, np.int64), np.asarray(w_q, np.int64), np.asarray(b_q, np.int64)
    w_scale = np.asarray(w_scale, np.float64)
    m = x_scale * w_scale / y_scale
    acc = (x64 - x_zp) @ w64 + b64
    narrow = {}
    for dtype in (np.int8, np.int16):  # what NumPy gives when the sums stay in a small integer type
        xs = _wrapping(x64 - x_zp, dtype)
        narrow[dtype] = _wrapping(_wrapping(xs @ w64, dtype) + b64, np.int32)
    out = [
        ("values past the int8 range wrapped around: np.clip(y, -128, 127) before .astype(np.int8)",
         _wrapping(_requantize(acc, m, y_zp, clip=False), np.int8)),
        ("you forgot the input zero point: subtract x_zero_point from x_q before the matrix "
         "product", _requantize(x64 @ w64 + b64, m, y_zp)),
        ("you added the input zero point: real x = x_scale * (x_q - x_zero_point), so subtract it",
         _requantize((x64 + x_zp) @ w64 + b64, m, y_zp)),
        ("your sums overflow: int8 arithmetic wraps around past 127. Accumulate in int32 "
         "(x_q.astype(np.int32) - x_zero_point) @ w_q.astype(np.int32)",
         _requantize(narrow[np.int8], m, y_zp)),
        ("x_q - x_zero_point overflowed int8 (127 - (-128) = 255 wraps around to -1): cast to "
         "int32 before subtracting, x_q.astype(np.int32) - x_zero_point",
         _requantize(_wrapping(x64 - x_zp, np.int8) @ w64 + b64, m, y_zp)),
        ("your sums overflow int16: a sum of many int8 x int8 products needs 32 bits, accumulate "
         "in int32", _requantize(narrow[np.int16], m, y_zp)),
        ("you added the bias after requantizing: b_q counts in units of x_scale * w_scale, "
         "like the accumulator, so add it to the int32 accumulator before multiplying by "
         "x_scale * w_scale / y_scale",
         np.clip(np.round((x64 - x_zp) @ w64 * m) + b64 + y_zp, -128, 127)),
        ("you forgot the bias b_q: add it to the int32 accumulator",
         _requantize(acc - b64, m, y_zp)),
        ("you forgot the output zero point: add y_zero_point after rounding",
         _requantize(acc, m, 0)),
        ("you subtracted the output zero point: y_q = round(real / y_scale) + y_zero_point",
         _requantize(acc, m, -y_zp)),
        ("you transposed the kernel: w_q has shape (in, out) as Keras stores a "
         "Dense kernel, so x_q @ w_q",
         _requantize((x64 - x_zp) @ w64.T + b64, m, y_zp) if w64.shape[0] == w64.shape[1]
         else None),
        ("you truncated instead of rounding: astype cuts off the fraction, so np.round first",
         _requantize(acc, m, y_zp, np.trunc)),
        ("you rounded down (floor): round to the nearest integer, np.round",
         _requantize(acc, m, y_zp, np.floor)),
        ("your requantization multiplier is upside down: it is x_scale * w_scale / y_scale",
         _requantize(acc, y_scale / (x_scale * w_scale), y_zp)),
        ("you did not divide by y_scale: x_scale * w_scale * acc is the real output, its code is "
         "that / y_scale", _requantize(acc, x_scale * w_scale, y_zp)),
        ("you multiplied by y_scale: the multiplier is x_scale * w_scale / y_scale",
         _requantize(acc, x_scale * w_scale * y_scale, y_zp)),
        ("you clamped to [-127, 127]: the output codes use the full int8 range [-128, 127] (only "
         "weights use the narrow range)", np.clip(_requantize(acc, m, y_zp), -127, 127)),
    ]
    if w_scale.ndim == 1 and w_scale.size > 1:
        for one in (w_scale[0], w_scale.mean(), w_scale.max()):
            out.append(("you used one weight scale for every output channel: w_scale "
                        "here holds one scale per output channel (the last axis of "
                        "w_q); let it broadcast, x_scale * np.asarray(w_scale) / "
                        "y_scale", _requantize(acc, x_scale * one / y_scale, y_zp)))
    return out


def _describe_dense(args) -> tuple:
    """(args, kwargs) for fail(): the inputs by name."""
    names = ("x_q", "x_scale", "x_zero_point", "w_q", "w_scale", "b_q", "y_scale", "y_zero_point")
    return (), dict(zip(names, args))


def _call_dense(call, args, shown):
    """The learner's int8_dense on a copy of `args`, as an array; a crash gets a hint on the
    likely cause (the kernel's orientation, a per-channel scale turned into a scalar)."""
    w_scale = args[4]
    given = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    try:
        return np.asarray(call(*given))
    except ExerciseError as error:
        text = str(error)
        raised = text.split("\n  on ")[0]   # what the learner's code raised, without the inputs
        if "shape" in raised or "mismatch" in raised or "aligned" in raised:
            raise ExerciseError(f"{text}\n  hint: x_q has shape (batch, in) and w_q (in, out), as "
                                "Keras stores a Dense kernel: the product is x_q @ w_q, of shape "
                                "(batch, out)") from None
        if np.ndim(w_scale) and ("convert" in raised or "size-1" in raised
                                 or "scalar" in raised):
            raise ExerciseError(f"{text}\n  hint: here w_scale holds one scale per output channel: "
                                "keep it an array (np.asarray(w_scale)) so that it broadcasts "
                                "along the last axis") from None
        raise


def _check_dense_codes(got, args, real, shown) -> np.ndarray:
    """`got` as float64 once it has the output's shape and holds integer codes, not real values."""
    x_q, w_q, y_scale, y_zp = args[0], args[3], args[6], args[7]
    batch, out = np.shape(x_q)[0], np.shape(w_q)[1]
    if got.shape != (batch, out):
        flipped = (" (transposed: one row per input row, one column per output)"
                   if got.shape == (out, batch) else "")
        fail("int8_dense", f"y_q should have shape ({batch}, {out}), got {got.shape}{flipped}",
             *shown)
    if got.dtype == bool or not np.issubdtype(got.dtype, np.number):
        fail("int8_dense", f"y_q should hold int8 codes, got dtype {got.dtype}", *shown)
    got = got.astype(np.float64)
    if not np.all(np.isfinite(got)) or not np.all(got == np.round(got)):
        if np.allclose(got, real * y_scale, rtol=1e-4, atol=1e-6) or \
                np.allclose(got, (np.round(real) + y_zp) * y_scale, rtol=1e-4, atol=1e-6):
            fail("int8_dense", "you returned real values: return the int8 codes, y_q = "
                               "round(real / y_scale) + y_zero_point, clipped to [-128, 127]",
                 *shown)
        fail("int8_dense", f"y_q should hold integer codes (round, then .astype(np.int8)); yours "
                           f"hold {got.ravel()[:4]} ...", *shown)
    return got


def _name_dense_mistake(got, expected, args, shown) -> None:
    """Fail with the likely mistake's name when `got` is out of int8 or matches a known mistake."""
    x_q, x_scale, x_zp, w_q, w_scale, b_q, y_scale, y_zp = args
    if got.min() < -128 or got.max() > 127:
        fail("int8_dense", f"your codes run from {got.min():g} to {got.max():g}: clamp them to the "
                           "int8 range with np.clip(y, -128, 127) before .astype(np.int8)", *shown)
    for message, mistake in _dense_mistakes(x_q, float(x_scale), int(x_zp), w_q, w_scale, b_q,
                                            float(y_scale), int(y_zp)):
        if mistake is None:
            continue
        mistake = np.asarray(mistake, np.float64)
        if mistake.shape == got.shape and not np.all(mistake == expected) and \
                np.max(np.abs(got - mistake)) <= 1 and np.mean(got == mistake) >= 0.9:
            fail("int8_dense", message, *shown)


def _fail_dense_example(got, right, expected, real, args, source: str, target, shown) -> None:
    """Fail with one wrong code worked through: accumulator, multiplier, rounding, clamping."""
    x_q, x_scale, x_zp, w_q, w_scale, b_q, y_scale, y_zp = args
    i, j = (int(v) for v in np.argwhere(~right)[0])
    scales = np.broadcast_to(np.asarray(w_scale, np.float64), (np.shape(w_q)[1],))
    multiplier = float(x_scale) * float(scales[j]) / float(y_scale)
    accumulator = int((np.asarray(x_q[i], np.int64) - int(x_zp)) @ np.asarray(w_q, np.int64)[:, j]
                      + int(b_q[j]))
    against = (f"LiteRT gives {int(target[i, j])}" if target is not None
               else f"expected {int(expected[i, j])}")
    fail("int8_dense", f"{int(np.sum(~right))} of {got.size} codes are wrong ({source}). For "
                       f"example y_q[{i}, {j}]: int32 accumulator {accumulator:,} x multiplier "
                       f"{multiplier:.6g} = {real[i, j]:.4f}, rounded, + y_zero_point {int(y_zp)}, "
                       f"clamped to [-128, 127]: {against}, yours is {int(got[i, j])}", *shown)


def _judge_dense(call, args, source: str, target=None) -> None:
    """Run the learner's int8_dense on `args` (`source` says where they come from). Right when
    equal to the exact arithmetic (either neighbour at a tie); with `target` (LiteRT's output),
    within one code of it."""
    x_q, x_scale, x_zp, w_q, w_scale, b_q, y_scale, y_zp = args
    shown = _describe_dense(args)
    real = exact_output(x_q, x_zp, w_q, w_scale, b_q, x_scale, y_scale)
    got = _check_dense_codes(_call_dense(call, args, shown), args, real, shown)
    expected = reference_dense(*args).astype(np.float64)
    near_tie = np.abs(np.abs(real - np.floor(real)) - 0.5) < TIE
    either = np.clip(np.floor(real) + y_zp, -128, 127), np.clip(np.ceil(real) + y_zp, -128, 127)
    right = (got == expected) | (near_tie & ((got == either[0]) | (got == either[1])))
    if target is not None:
        right = np.abs(got - target) <= 1
    if right.all():
        return
    _name_dense_mistake(got, expected, args, shown)
    _fail_dense_example(got, right, expected, real, args, source, target, shown)


def _i8(rows) -> np.ndarray:
    return np.array(rows, np.int8)


_DENSE_BY_HAND = [   # (x_q, x_scale, x_zero_point, w_q, w_scale, b_q, y_scale, y_zero_point)
    # multiplier 0.5 * 0.25 / 2 = 1/16; accumulators -78 and 92 -> -4.875 and 5.75 -> codes 0 and 11
    (_i8([[10, -20, 30]]), 0.5, -10, _i8([[1, 2], [3, -1], [-2, 1]]), 0.25,
     np.array([12, 2], np.int32), 2.0, 5),
    # x_q - x_zero_point = 255, and 4 x 255 x 127 - 10540 = 119000: far
    # beyond int8 and int16; multiplier
    # 0.001 -> 119 and -10.54 -> codes 99 and -31
    (_i8([[127, 127, 127, 127], [-128, -128, -128, -128]]), 0.025, -128, _i8([[127]] * 4), 0.004,
     np.array([-10540], np.int32), 0.1, -20),
    # accumulators 300, -300 and 0 with multiplier 1: codes 310 and -290
    # saturate at 127 and -128; 10
    (_i8([[100, -100]]), 1.0, 0, _i8([[2, -2, 1], [-1, 1, 1]]), 1.0, np.zeros(3, np.int32), 1.0,
     10),
    # a square kernel (in = out = 3), two inputs; multiplier 0.5 * 0.2 / 0.25 = 0.4, accumulators
    # [[11, 4, 2], [5, 4, 3]] -> codes [[1, -1, -2], [-1, -1, -2]]
    (_i8([[1, 2, 3], [-4, 0, 4]]), 0.5, 1, _i8([[1, 0, 0], [2, 1, 0], [3, 2, 1]]), 0.2,
     np.array([3, -1, 0], np.int32), 0.25, -3),
]

# one scale per output channel: multipliers 0.5 * [0.5, 0.125] / 0.25 = [1, 0.25]; accumulators
# [[18, 7], [-4, -4]] -> [[18, 1.75], [-4, -1]] -> codes [[21, 5], [-1, 2]]
_DENSE_PER_CHANNEL = (_i8([[6, -3], [1, 4]]), 0.5, 2, _i8([[3, 5], [-1, 2]]),
                      np.array([0.5, 0.125], np.float32), np.array([1, -3], np.int32), 0.25, 3)


def _random_dense(rng, per_channel: bool) -> tuple:
    batch, n_in, n_out = int(rng.integers(1, 6)), int(rng.integers(1, 65)), int(rng.integers(1, 17))
    x_q = rng.integers(-128, 128, (batch, n_in)).astype(np.int8)
    w_q = rng.integers(-127, 128, (n_in, n_out)).astype(np.int8)
    x_scale, x_zp = float(rng.uniform(0.005, 0.1)), int(rng.integers(-128, 128))
    w_scale = (rng.uniform(0.001, 0.02, n_out).astype(np.float32) if per_channel
               else float(rng.uniform(0.001, 0.02)))
    b_q = rng.normal(0, 2000, n_out).astype(np.int32)
    accumulator = (x_q.astype(np.int64) - x_zp) @ w_q.astype(np.int64) + b_q
    spread = float(np.std(accumulator * x_scale * np.asarray(w_scale, np.float64))) + 1e-6
    y_scale, y_zp = spread / float(rng.uniform(20, 60)), int(rng.integers(-30, 31))
    return x_q, x_scale, x_zp, w_q, w_scale, b_q, y_scale, y_zp


TINY_DENSE = (8, 4)   # inputs, outputs of the model the converter quantizes


@functools.lru_cache(maxsize=None)
def converted_dense(per_channel: bool) -> dict:
    """A tiny tf_keras Dense layer converted to a full-integer int8 .tflite by
    quantization.converter, with what the file stores: x_scale, x_zero_point, w_q (in, out),
    w_scale, b_q, y_scale, y_zero_point, and the file's bytes. per_channel=False asks the converter
    for one weight scale (per tensor)."""
    # imported here: labkit.check itself loads without TensorFlow
    import tf_keras as keras

    from labkit import models, quantization, tflite
    n_in, n_out = TINY_DENSE
    rng = np.random.default_rng(14)
    # zero initializers: no random number of the caller's is drawn
    inputs = keras.Input((n_in,), name="x")
    layer = keras.layers.Dense(n_out, kernel_initializer="zeros", bias_initializer="zeros",
                               name="dense")
    model = keras.Model(inputs, layer(inputs), name="tiny_dense")
    layer.set_weights([rng.normal(0, 0.5, (n_in, n_out)).astype(np.float32),
                       rng.normal(0, 0.3, n_out).astype(np.float32)])
    converter = quantization.converter(model, "int8",
                                       rng.normal(0, 1, (200, n_in)).astype(np.float32))
    if not per_channel:
        converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    with tempfile.TemporaryDirectory() as folder:
        path = models.save_tflite(converter, Path(folder) / "tiny_dense.tflite")
        stored = next(iter(tflite.weights(path).values()))
        found = tflite.interpreter(path)
        (x_scale, x_zp), (y_scale, y_zp) = (found.get_input_details()[0]["quantization"],
                                            found.get_output_details()[0]["quantization"])
        content = path.read_bytes()
    scales = np.asarray(stored["scales"], np.float32)
    return {"x_scale": float(x_scale), "x_zero_point": int(x_zp),
            "w_q": np.ascontiguousarray(stored["values"].T),   # the file stores (out, in)
            "w_scale": float(scales[0]) if scales.size == 1 else scales,
            "b_q": stored["bias"], "y_scale": float(y_scale), "y_zero_point": int(y_zp),
            "op": stored["op"], "content": content}


def run_converted(file: dict, x_q: np.ndarray) -> np.ndarray:
    """LiteRT's int8 output of the converted file for the int8 inputs x_q (batch, in)."""
    # imported here: labkit.check itself loads light (no LiteRT, no TensorFlow)
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    with labkit.quiet_stderr():   # no XNNPACK: LiteRT's built-in integer kernels
        builtin = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        found = Interpreter(model_content=file["content"], experimental_op_resolver_type=builtin)
    index = found.get_input_details()[0]["index"]
    found.resize_tensor_input(index, x_q.shape)
    found.allocate_tensors()
    found.set_tensor(index, np.ascontiguousarray(x_q, np.int8))
    found.invoke()
    return found.get_tensor(found.get_output_details()[0]["index"]).copy()


def _converter_inputs(file: dict, rng) -> np.ndarray:
    """int8 inputs: 24 real-looking rows quantized with the file's input
    parameters, 8 anywhere in int8."""
    n_in = TINY_DENSE[0]
    real = rng.normal(0, 1, (24, n_in))
    typical = np.clip(np.round(real / file["x_scale"]) + file["x_zero_point"], -128, 127)
    return np.concatenate([typical, rng.integers(-128, 128, (8, n_in))]).astype(np.int8)


@exercise("int8_dense", "04", "quantization.converter",
          "int8_dense(x_q, x_scale, x_zero_point, w_q, w_scale, b_q, y_scale, y_zero_point) -> y_q")
def int8_dense(call):
    """An integer-only dense layer: 4 cases by hand and one with per-channel weight scales, 20
    random ones against the integer arithmetic, then a tiny Dense model converted to full-integer
    int8 (per tensor and per channel), its parameters read from the .tflite and its int8 outputs
    from LiteRT, to within one code."""
    for case in _DENSE_BY_HAND:
        _judge_dense(call, case, "a case by hand")
    rng = np.random.default_rng(405)
    cases = 20
    for _ in range(cases // 2):
        _judge_dense(call, _random_dense(rng, per_channel=False), "a random case")
    _judge_dense(call, _DENSE_PER_CHANNEL, "one weight scale per output channel, by hand")
    for _ in range(cases // 2):
        _judge_dense(call, _random_dense(rng, per_channel=True), "a random case, one weight "
                                                                 "scale per output channel")
    files = 0
    for per_channel in (False, True):
        file = converted_dense(per_channel)
        x_q = _converter_inputs(file, rng)
        args = (x_q, file["x_scale"], file["x_zero_point"], file["w_q"], file["w_scale"],
                file["b_q"], file["y_scale"], file["y_zero_point"])
        granularity = "per-channel" if np.ndim(file["w_scale"]) else "per-tensor"
        _judge_dense(call, args, f"the converter's {granularity} .tflite",
                     target=run_converted(file, x_q))
        files += 1
    return (f"{len(_DENSE_BY_HAND) + 1} cases by hand, {cases} random ones, and {len(x_q)} inputs "
            f"through each of {files} converted .tflite files, against LiteRT to within one code")
