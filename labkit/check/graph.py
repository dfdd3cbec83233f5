"""Checkers for the graph chapter's exercises: batch norm in inference mode, folding it into a conv.

The references are tf_keras's own BatchNormalization layer (training=False) and
`folding.fold_conv_bn`; the folded weights are also run through a real convolution. TensorFlow is
imported inside the checkers, never when this module is imported.
"""
from __future__ import annotations

import numpy as np

from labkit.check import exercise, fail

RTOL, ATOL = 1e-4, 1e-5   # float32 arithmetic, done in any order, lands well inside this


# ----------------------------------------------------------------------------- shared helpers

def _as_array(name: str, value, what: str, args) -> np.ndarray:
    """The learner's result as a float64 array, or an ExerciseError that
    says what came back instead."""
    if value is None:
        fail(name, f"{what} is None: did you forget a `return`, or return the result "
                   "of an in-place operation?",
             args)
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        fail(name, f"{what} should be an array of numbers, got "
                   f"{type(value).__name__}: {value!r:.80}", args)
    return array


def _close(got: np.ndarray, expected: np.ndarray) -> bool:
    return got.shape == np.shape(expected) \
        and bool(np.allclose(got, expected, rtol=RTOL, atol=ATOL))


def _show(values: np.ndarray) -> str:
    values = np.asarray(values, dtype=np.float64)
    if values.size <= 12:
        return np.array2string(values, precision=4, separator=", ",
                               suppress_small=True).replace("\n", "")
    return f"an array of shape {values.shape}"


def _worst(got: np.ndarray, expected: np.ndarray) -> str:
    """Where got and expected differ most, as a learner can read it."""
    if not np.all(np.isfinite(got)):
        bad = int(np.sum(~np.isfinite(got)))
        return f"{bad} of your {got.size} values are NaN or infinite (a division by zero?)"
    diff = np.abs(got - expected)
    at = np.unravel_index(int(np.argmax(diff)), diff.shape)
    return (f"the largest difference is {diff[at]:.4g} at index {tuple(int(i) for i in at)}: "
            f"expected {expected[at]:.6g}, got {got[at]:.6g}")


def _diagnose(got: np.ndarray, candidates: list) -> str | None:
    """The message of the first typical mistake whose result equals `got`, or None."""
    for message, wrong in candidates:
        try:
            with np.errstate(divide="ignore", invalid="ignore"):
                wrong = np.asarray(wrong(), dtype=np.float64)
        except ValueError:   # that mistake cannot even be made on these shapes
            continue
        if _close(got, wrong):
            return message
    return None


def _per_channel(values, ndim: int) -> np.ndarray:
    """A (C,) parameter shaped to broadcast along the last axis of an ndim-dimensional tensor."""
    return np.asarray(values, np.float64).reshape((1,) * (ndim - 1) + (-1,))


# ----------------------------------------------------------------------- batch norm, inference mode

def _keras_batchnorm(x, gamma, beta, mean, variance, epsilon) -> np.ndarray:
    """tf_keras BatchNormalization with these weights, called in inference mode."""
    # imported here: labkit.check itself loads without TensorFlow
    import tf_keras as keras
    layer = keras.layers.BatchNormalization(axis=-1, epsilon=epsilon)
    layer.build((None, *x.shape[1:]))
    layer.set_weights([gamma, beta, mean, variance])
    return layer(x, training=False).numpy().astype(np.float64)


def _batchnorm_mistakes(x, gamma, beta, mean, variance, epsilon) -> list:
    """(diagnosis, what that mistake returns) for the typical wrong batch norms."""
    x = np.asarray(x, np.float64)
    g, b, m, v = (_per_channel(p, x.ndim) for p in (gamma, beta, mean, variance))
    batch_axes = tuple(range(x.ndim - 1))
    return [
        ("the variance is not square-rooted: divide by sqrt(variance + epsilon), the standard "
         "deviation, not by variance + epsilon", lambda: g * (x - m) / (v + epsilon) + b),
        ("you forgot epsilon: divide by sqrt(variance + epsilon), not sqrt(variance) (epsilon "
         "keeps a channel with variance 0 finite)", lambda: g * (x - m) / np.sqrt(v) + b),
        ("epsilon is added after the square root: sqrt(variance + epsilon), not "
         "sqrt(variance) + epsilon",
         lambda: g * (x - m) / (np.sqrt(v) + epsilon) + b),
        ("you forgot beta: the shift `+ beta` comes after scaling by gamma",
         lambda: g * (x - m) / np.sqrt(v + epsilon)),
        ("you forgot gamma: multiply the normalized value by gamma before adding beta",
         lambda: (x - m) / np.sqrt(v + epsilon) + b),
        ("beta is added before scaling: gamma * (x - mean) / sqrt(variance + "
         "epsilon) + beta, beta outside",
         lambda: g * ((x - m) / np.sqrt(v + epsilon) + b)),
        ("you forgot to subtract the mean", lambda: g * x / np.sqrt(v + epsilon) + b),
        ("you multiplied by sqrt(variance + epsilon) instead of dividing by it",
         lambda: g * (x - m) * np.sqrt(v + epsilon) + b),
        ("you normalized with the batch's own mean and variance: that is training mode; inference "
         "uses the stored moving `mean` and `variance` you are given",
         lambda: g * (x - x.mean(axis=batch_axes, keepdims=True))
         / np.sqrt(x.var(axis=batch_axes, keepdims=True) + epsilon) + b),
    ]


def _check_batchnorm(call, x, gamma, beta, mean, variance, epsilon, expected) -> None:
    name = "batchnorm_inference"
    args = (x, gamma, beta, mean, variance, epsilon)
    got = _as_array(name, call(*(np.array(a) for a in args[:5]), epsilon), "y", args)
    if got.shape != x.shape:
        fail(name, f"wrong shape: y must have x's shape {x.shape}, got {got.shape} "
                   "(normalize each value; gamma, beta, mean and variance hold one number per "
                   "channel, the last axis)",
             args)
    if _close(got, expected):
        return
    mistake = _diagnose(got, _batchnorm_mistakes(*args))
    if mistake:
        fail(name, mistake, args)
    where = f"expected {_show(expected)}, got {_show(got)}; " if got.size <= 12 else ""
    fail(name, f"y is wrong: {where}{_worst(got, expected)}. "
               "In inference mode y = gamma * (x - mean) / sqrt(variance + epsilon) + beta, "
               "per channel (last axis)",
         args)


def _random_batchnorm_case(rng, shape):
    channels = shape[-1]
    x = rng.normal(0.5, 2.0, shape).astype(np.float32)
    gamma = (rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels)).astype(np.float32)
    beta = rng.normal(0, 1, channels).astype(np.float32)
    mean = rng.normal(0, 1, channels).astype(np.float32)
    variance = rng.uniform(0.05, 3.0, channels).astype(np.float32)
    return x, gamma, beta, mean, variance


@exercise("batchnorm_inference", "05", "keras.layers.BatchNormalization",
          "batchnorm_inference(x, gamma, beta, mean, variance, epsilon) -> y, x's shape, "
          "channels on the last axis")
def batchnorm_inference(call):
    """One case by hand (2 channels, epsilon 1, so that sqrt(variance + epsilon) is 2
    and 3), then random 2-D and 4-D inputs against a tf_keras BatchNormalization layer
    called with training=False."""
    # By hand: channel 0 is (x - 1) * 4 / 2 + 0.5, channel 1 is (x - 2) * -3 / 3 - 1.
    x = np.array([[1.0, 2.0], [3.0, 5.0], [-1.0, 8.0]], np.float32)
    gamma, beta = np.array([4.0, -3.0], np.float32), np.array([0.5, -1.0], np.float32)
    mean, variance = np.array([1.0, 2.0], np.float32), np.array([3.0, 8.0], np.float32)
    by_hand = np.array([[0.5, -1.0], [4.5, -4.0], [-3.5, -7.0]])
    _check_batchnorm(call, x, gamma, beta, mean, variance, 1.0, by_hand)

    rng = np.random.default_rng(5)
    shapes = [(4, 3), (6, 1), (5, 8), (2, 4, 4, 3), (1, 3, 5, 6), (3, 2, 2, 1)]
    cases = 0
    for shape in shapes:
        for epsilon in (1e-3, 0.1):
            case = _random_batchnorm_case(rng, shape)
            _check_batchnorm(call, *case, epsilon, _keras_batchnorm(*case, epsilon))
            cases += 1
    return (f"1 case by hand, {cases} random 2-D and 4-D ones against tf_keras "
            "BatchNormalization(training=False)")


# ------------------------------------------------------------------- folding batch norm into a conv

def _fold_mistakes(kernel, bias, gamma, beta, mean, variance, epsilon) -> tuple[list, list]:
    """(kernel mistakes, bias mistakes): (diagnosis, what that mistake returns)
    for the typical wrong folds."""
    k, b = np.asarray(kernel, np.float64), np.asarray(bias, np.float64)
    g, beta_, m, v = (np.asarray(p, np.float64) for p in (gamma, beta, mean, variance))
    s = g / np.sqrt(v + epsilon)
    kernel_mistakes = [
        ("the kernel is scaled along the input-channel axis: a Keras Conv2D kernel is (kh, "
         "kw, in, out) and each OUTPUT channel's filter gets its own factor, so scale the "
         "last axis (kernel * scale)",
         lambda: k * s[:, None]),
        ("the kernel: the square root is missing, scale = gamma / sqrt(variance + epsilon)",
         lambda: k * g / (v + epsilon)),
        ("the kernel: you forgot epsilon, scale = gamma / sqrt(variance + epsilon)",
         lambda: k * g / np.sqrt(v)),
        ("the kernel: epsilon belongs under the square root, scale = gamma / "
         "sqrt(variance + epsilon)",
         lambda: k * g / (np.sqrt(v) + epsilon)),
        ("the kernel: you forgot gamma, scale = gamma / sqrt(variance + epsilon)",
         lambda: k / np.sqrt(v + epsilon)),
        ("the kernel is divided by the scale; multiply it: kernel * gamma / "
         "sqrt(variance + epsilon)",
         lambda: k / s),
        ("the kernel is unchanged: the batch norm's scale gamma / sqrt(variance + "
         "epsilon) must go into it",
         lambda: k),
    ]
    bias_mistakes = [
        ("the bias: you forgot to subtract the mean, new bias = (bias - mean) * scale + beta",
         lambda: b * s + beta_),
        ("the bias: you forgot the old bias, new bias = (bias - mean) * scale + beta",
         lambda: -m * s + beta_),
        ("the bias: you forgot beta, new bias = (bias - mean) * scale + beta", lambda: (b - m) * s),
        ("the bias: (bias - mean) must be multiplied by the scale, new bias = "
         "(bias - mean) * scale + beta",
         lambda: b - m + beta_),
        ("the bias: only the mean is scaled; the old bias passes through the batch norm too, "
         "new bias = (bias - mean) * scale + beta", lambda: b - m * s + beta_),
        ("the bias: beta is scaled too; it is added after scaling, new bias = "
         "(bias - mean) * scale + beta",
         lambda: (b - m + beta_) * s),
        ("the bias: the square root is missing in the scale, new bias = (bias - mean) * gamma / "
         "sqrt(variance + epsilon) + beta", lambda: (b - m) * g / (v + epsilon) + beta_),
        ("the bias: you forgot epsilon in the scale", lambda: (b - m) * g / np.sqrt(v) + beta_),
        ("the bias: you forgot gamma in the scale", lambda: (b - m) / np.sqrt(v + epsilon) + beta_),
        ("the bias is unchanged: it becomes (bias - mean) * scale + beta", lambda: b),
    ]
    return kernel_mistakes, bias_mistakes


def _check_fold(call, kernel, bias, gamma, beta, mean, variance, epsilon, expected) -> tuple:
    """Run the learner's fold on one case, compare with expected (kernel,
    bias); return the learner's pair."""
    name = "fold_conv_bn"
    args = (kernel, bias, gamma, beta, mean, variance, epsilon)
    result = call(*(np.array(a) for a in args[:6]), epsilon)
    if result is None:
        fail(name, "your function returned None: did you forget the `return`? Return "
                   "the pair (kernel, bias)", args)
    if isinstance(result, np.ndarray) or not isinstance(result, (tuple, list)) or len(result) != 2:
        what = (f"an array of shape {result.shape}" if isinstance(result, np.ndarray)
                else repr(result)[:80])
        fail(name, f"return a pair (kernel, bias), got {what}", args)
    got_kernel = _as_array(name, result[0], "the kernel (first in the pair)", args)
    got_bias = _as_array(name, result[1], "the bias (second in the pair)", args)
    out = kernel.shape[-1]
    if got_kernel.shape == (out,) and got_bias.shape == kernel.shape:
        fail(name, "kernel and bias are swapped: return (kernel, bias), kernel of "
                   f"shape {kernel.shape} first", args)
    if got_kernel.shape != kernel.shape:
        fail(name, f"wrong kernel shape: expected {kernel.shape} (kh, kw, in, out) like the input "
                   f"kernel, got {got_kernel.shape}", args)
    if got_bias.shape != (out,):
        fail(name, f"wrong bias shape: expected ({out},), one value per output channel as a Keras "
                   f"Conv2D stores it, got {got_bias.shape}", args)
    expected_kernel, expected_bias = (np.asarray(e, np.float64) for e in expected)
    kernel_mistakes, bias_mistakes = _fold_mistakes(*args)
    if not _close(got_kernel, expected_kernel):
        mistake = _diagnose(got_kernel, kernel_mistakes)
        where = (f"expected {_show(expected_kernel)}, got {_show(got_kernel)}; "
                 if got_kernel.size <= 12 else "")
        fail(name, mistake or f"the kernel is wrong: {where}{_worst(got_kernel, expected_kernel)}. "
                              "Each output channel's filter (last axis) is multiplied by gamma / "
                              "sqrt(variance + epsilon)", args)
    if not _close(got_bias, expected_bias):
        mistake = _diagnose(got_bias, bias_mistakes)
        where = f"expected {_show(expected_bias)}, got {_show(got_bias)}"
        fail(name, mistake or f"the kernel is right, the bias is wrong: {where}. "
                              "New bias = (bias - mean) * gamma / sqrt(variance + epsilon) + beta",
             args)
    return got_kernel, got_bias


def _random_fold_case(rng, kh, channels_in, channels_out):
    kernel = rng.normal(0, 0.3, (kh, kh, channels_in, channels_out)).astype(np.float32)
    bias = rng.normal(0, 0.5, channels_out).astype(np.float32)
    signs = rng.choice([-1, 1], channels_out)
    gamma = (rng.uniform(0.5, 2.0, channels_out) * signs).astype(np.float32)
    beta = rng.normal(0, 1, channels_out).astype(np.float32)
    mean = rng.normal(0, 1, channels_out).astype(np.float32)
    variance = rng.uniform(0.05, 3.0, channels_out).astype(np.float32)
    return kernel, bias, gamma, beta, mean, variance


def _conv_then_batchnorm(x, kernel, bias, gamma, beta, mean, variance, epsilon) -> np.ndarray:
    """tf_keras Conv2D (same padding, with bias) followed by
    BatchNormalization, in inference mode."""
    # imported here: labkit.check itself loads without TensorFlow
    import tf_keras as keras
    conv = keras.layers.Conv2D(kernel.shape[-1], kernel.shape[:2], padding="same")
    bn = keras.layers.BatchNormalization(epsilon=epsilon)
    conv.build((None, *x.shape[1:]))
    bn.build((None, *x.shape[1:3], kernel.shape[-1]))
    conv.set_weights([kernel, bias])
    bn.set_weights([gamma, beta, mean, variance])
    return bn(conv(x), training=False).numpy().astype(np.float64)


def _conv(x, kernel, bias) -> np.ndarray:
    """One convolution with the given weights (same padding), as the folded Conv2D computes it."""
    # imported here: labkit.check itself loads without TensorFlow
    import tensorflow as tf
    y = (tf.nn.conv2d(x, kernel.astype(np.float32), strides=1, padding="SAME")
         + bias.astype(np.float32))
    return y.numpy().astype(np.float64)


@exercise("fold_conv_bn", "05", "folding.fold_conv_bn",
          "fold_conv_bn(kernel, bias, gamma, beta, mean, variance, epsilon) -> (kernel, bias), "
          "kernel (kh, kw, in, out) as Keras stores a Conv2D's")
def fold_conv_bn(call):
    """One 1x1 case by hand, random kernels against folding.fold_conv_bn, then the folded
    weights run as a convolution against tf_keras Conv2D -> BatchNormalization
    (training=False) on a small image."""
    # imported here: labkit.check itself loads without TensorFlow
    from labkit import folding

    # By hand: scale = [4 / 2, 3 / 3] = [2, 1]; output channel 0's filter doubles, channel 1's
    # stays; bias = [(0.5 - 1) * 2 + 1, (1 + 1) * 1 + 0] = [0, 2].
    kernel = np.array([[[[1.0, 2.0], [3.0, 4.0]]]], np.float32)          # (1, 1, in=2, out=2)
    bias, gamma = np.array([0.5, 1.0], np.float32), np.array([4.0, 3.0], np.float32)
    beta, mean = np.array([1.0, 0.0], np.float32), np.array([1.0, -1.0], np.float32)
    variance = np.array([3.0, 8.0], np.float32)
    by_hand = (np.array([[[[2.0, 2.0], [6.0, 4.0]]]]), np.array([0.0, 2.0]))
    _check_fold(call, kernel, bias, gamma, beta, mean, variance, 1.0, by_hand)

    rng = np.random.default_rng(5)
    shapes = [(3, 1, 4), (3, 2, 3), (1, 3, 5), (3, 4, 2), (5, 2, 6), (3, 8, 8)]
    cases = 0
    for kh, channels_in, channels_out in shapes:
        for epsilon in (1e-3, 0.1):
            case = _random_fold_case(rng, kh, channels_in, channels_out)
            _check_fold(call, *case, epsilon, folding.fold_conv_bn(*case, epsilon))
            cases += 1

    convolutions = 0
    for kh, channels_in, channels_out in [(3, 1, 4), (3, 3, 2), (1, 2, 3)]:
        case = _random_fold_case(rng, kh, channels_in, channels_out)
        epsilon = 1e-3
        x = rng.normal(0, 1, (2, 6, 6, channels_in)).astype(np.float32)
        expected = _conv_then_batchnorm(x, *case, epsilon)
        folded_kernel, folded_bias = _check_fold(call, *case, epsilon,
                                                 folding.fold_conv_bn(*case, epsilon))
        got = _conv(x, folded_kernel, folded_bias)
        if not np.allclose(got, expected, rtol=1e-4, atol=1e-4):
            fail("fold_conv_bn", "conv(x, your kernel) + your bias differs from "
                                 f"batchnorm(conv(x)): {_worst(got, expected)}", case + (epsilon,))
        convolutions += 1
    return (f"1 case by hand, {cases} random ones against folding.fold_conv_bn, {convolutions} "
            "folded convolutions run on small images against tf_keras Conv2D -> BatchNormalization")
