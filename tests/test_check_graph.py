"""Checkers of notebook 05's exercises (labkit/check/graph.py):
batchnorm_inference and fold_conv_bn.

Each must accept every correct answer (the instructor's solution, one written
differently here, labkit's or TensorFlow's own) and reject the typical wrong ones with
the message that names the mistake.
"""
import subprocess
import sys
import time

import numpy as np
import pytest

# the chapter module itself: no need to load every chapter's checkers
import labkit.check.graph as checkers
import labkit.check.solutions as solutions
from labkit import ROOT, check, folding

# ----------------------------------------------------------------------------- batchnorm_inference

def bn_loops(x, gamma, beta, mean, variance, epsilon):
    """Correct, written differently: channel by channel, in float64, returned as nested lists."""
    x = np.asarray(x, np.float64)
    y = np.empty_like(x)
    for c in range(x.shape[-1]):
        std = (float(variance[c]) + epsilon) ** 0.5
        y[..., c] = (x[..., c] - mean[c]) * (gamma[c] / std) + beta[c]
    return y.tolist()


def bn_tensorflow(x, gamma, beta, mean, variance, epsilon):
    """TensorFlow's own op, adapted to the signature."""
    import tensorflow as tf
    return tf.nn.batch_normalization(x, mean, variance, beta, gamma, epsilon).numpy()


def bn_float32_in_place(x, gamma, beta, mean, variance, epsilon):
    """Correct, float32 throughout, overwriting its input (the checker passes copies)."""
    x -= mean
    x *= gamma / np.sqrt(variance + np.float32(epsilon))
    x += beta
    return x


@pytest.mark.parametrize("answer", [solutions.batchnorm_inference, bn_loops, bn_tensorflow,
                                    bn_float32_in_place])
def test_batchnorm_inference_accepts_correct_answers(answer, capsys):
    checkers.batchnorm_inference(answer)
    assert "✓ batchnorm_inference: correct" in capsys.readouterr().out
    assert check.STATUS["batchnorm_inference"] == "correct"


def bn_wrong(body):
    """A wrong batch norm from the expression `body` in x, g, b, m, v, eps."""
    def answer(x, gamma, beta, mean, variance, epsilon):
        names = dict(x=x, g=gamma, b=beta, m=mean, v=variance, eps=epsilon)
        return eval(body, {"np": np}, names)
    return answer


BN_MISTAKES = {
    "variance not square-rooted": ("g * (x - m) / (v + eps) + b", "not square-rooted"),
    "forgot epsilon": ("g * (x - m) / np.sqrt(v) + b", "you forgot epsilon"),
    "epsilon after the root": ("g * (x - m) / (np.sqrt(v) + eps) + b",
                               "added after the square root"),
    "forgot beta": ("g * (x - m) / np.sqrt(v + eps)", "you forgot beta"),
    "forgot gamma": ("(x - m) / np.sqrt(v + eps) + b", "you forgot gamma"),
    "beta inside": ("g * ((x - m) / np.sqrt(v + eps) + b)", "beta is added before scaling"),
    "forgot the mean": ("g * x / np.sqrt(v + eps) + b", "forgot to subtract the mean"),
    "multiplied by the std": ("g * (x - m) * np.sqrt(v + eps) + b", "multiplied by sqrt"),
    "batch statistics": ("g * (x - x.mean(0)) / np.sqrt(x.var(0) + eps) + b", "training mode"),
    "reduced to one row": ("(g * (x - m) / np.sqrt(v + eps) + b).mean(0)",
                           "wrong shape: y must have x's shape"),
    "off somewhere else": ("g * (x - m) / np.sqrt(v + eps) + b + 0.01",
                           "y is wrong: expected .* largest difference"),
    "no return": ("None", "y is None: did you forget a `return`"),
    "a string": ("'y'", "array of numbers"),
}


@pytest.mark.parametrize("mistake", BN_MISTAKES)
def test_batchnorm_inference_names_the_mistake(mistake):
    body, message = BN_MISTAKES[mistake]
    with pytest.raises(check.ExerciseError, match=message):
        checkers.batchnorm_inference(bn_wrong(body))


def test_batchnorm_training_mode_over_all_axes_is_named_on_4d_inputs():
    def batch_stats(x, gamma, beta, mean, variance, epsilon):
        axes = tuple(range(x.ndim - 1))
        # right on the case by hand, so that a 4-D case catches it
        if x.ndim == 2 and x.shape == (3, 2):
            return gamma * (x - mean) / np.sqrt(variance + epsilon) + beta
        return gamma * (x - x.mean(axes)) / np.sqrt(x.var(axes) + epsilon) + beta
    with pytest.raises(check.ExerciseError, match="training mode"):
        checkers.batchnorm_inference(batch_stats)


def test_batchnorm_case_by_hand_is_what_keras_computes():
    x = np.array([[1.0, 2.0], [3.0, 5.0], [-1.0, 8.0]], np.float32)
    params = [np.array(p, np.float32) for p in ([4.0, -3.0], [0.5, -1.0], [1.0, 2.0], [3.0, 8.0])]
    np.testing.assert_allclose(checkers._keras_batchnorm(x, *params, 1.0),
                               [[0.5, -1.0], [4.5, -4.0], [-3.5, -7.0]], atol=1e-6)
    # every typical mistake gives its own result on the case by hand, so each gets its own message
    results = [np.asarray(wrong()) for _, wrong in checkers._batchnorm_mistakes(x, *params, 1.0)]
    right = np.asarray(solutions.batchnorm_inference(x, *params, 1.0))
    for i, a in enumerate(results):
        assert not np.allclose(a, right)
        assert all(not np.allclose(a, b) for b in results[i + 1:])


# ----------------------------------------------------------------------------- fold_conv_bn

def fold_loops(kernel, bias, gamma, beta, mean, variance, epsilon):
    """Correct, written differently: output channel by output channel,
    float64, returned as a list."""
    kernel = np.array(kernel, np.float64)
    new_bias = []
    for c in range(kernel.shape[-1]):
        scale = gamma[c] / np.sqrt(variance[c] + epsilon)
        kernel[:, :, :, c] *= scale
        new_bias.append(beta[c] + scale * bias[c] - scale * mean[c])
    return [kernel, np.array(new_bias)]


def fold_einsum_in_place(kernel, bias, gamma, beta, mean, variance, epsilon):
    """Correct, float32, with einsum, overwriting its inputs (the checker passes copies)."""
    inv_std = 1.0 / np.sqrt(variance + np.float32(epsilon))
    bias -= mean
    bias *= gamma * inv_std
    bias += beta
    return np.einsum("hwio,o->hwio", kernel, gamma * inv_std), bias


@pytest.mark.parametrize("answer", [solutions.fold_conv_bn, folding.fold_conv_bn, fold_loops,
                                    fold_einsum_in_place])
def test_fold_conv_bn_accepts_correct_answers(answer, capsys):
    checkers.fold_conv_bn(answer)
    out = capsys.readouterr().out
    assert "✓ fold_conv_bn: correct" in out and "Conv2D -> BatchNormalization" in out


def fold_wrong(kernel_expr="k * s", bias_expr="(b - m) * s + beta"):
    """A wrong fold from expressions in k, b, g, beta, m, v, eps and s = g / sqrt(v + eps)."""
    def answer(kernel, bias, gamma, beta, mean, variance, epsilon):
        names = dict(k=kernel, b=bias, g=gamma, beta=beta, m=mean, v=variance, eps=epsilon,
                     s=gamma / np.sqrt(variance + epsilon))
        return eval(kernel_expr, {"np": np}, names), eval(bias_expr, {"np": np}, names)
    return answer


FOLD_MISTAKES = {
    "scaled the input axis": (fold_wrong("k * s[:, None]"), "input-channel axis"),
    "kernel sqrt missing": (fold_wrong("k * g / (v + eps)", "(b - m) * g / (v + eps) + beta"),
                            "the kernel: the square root is missing"),
    "kernel forgot epsilon": (fold_wrong("k * g / np.sqrt(v)"), "the kernel: you forgot epsilon"),
    "kernel epsilon outside the root": (fold_wrong("k * g / (np.sqrt(v) + eps)"),
                                        "epsilon belongs under"),
    "kernel forgot gamma": (fold_wrong("k / np.sqrt(v + eps)"), "the kernel: you forgot gamma"),
    "kernel divided": (fold_wrong("k / s"), "divided by the scale"),
    "kernel unchanged": (fold_wrong("k"), "the kernel is unchanged"),
    "forgot the mean": (fold_wrong(bias_expr="b * s + beta"), "forgot to subtract the mean"),
    "forgot the old bias": (fold_wrong(bias_expr="-m * s + beta"), "forgot the old bias"),
    "forgot beta": (fold_wrong(bias_expr="(b - m) * s"), "the bias: you forgot beta"),
    "bias not scaled": (fold_wrong(bias_expr="b - m + beta"), "must be multiplied by the scale"),
    "only the mean scaled": (fold_wrong(bias_expr="b - m * s + beta"), "only the mean is scaled"),
    "beta scaled": (fold_wrong(bias_expr="(b - m + beta) * s"), "beta is scaled too"),
    "bias sqrt missing": (fold_wrong(bias_expr="(b - m) * g / (v + eps) + beta"),
                          "square root is missing"),
    "bias forgot epsilon": (fold_wrong(bias_expr="(b - m) * g / np.sqrt(v) + beta"),
                            "the bias: you forgot epsilon"),
    "bias forgot gamma": (fold_wrong(bias_expr="(b - m) / np.sqrt(v + eps) + beta"),
                          "the bias: you forgot gamma"),
    "bias unchanged": (fold_wrong(bias_expr="b"), "the bias is unchanged"),
    "bias off somewhere else": (fold_wrong(bias_expr="(b - m) * s + beta + 0.01"),
                                "the kernel is right, the bias is wrong: expected"),
    "kernel off somewhere else": (fold_wrong("k * s + 0.01"),
                                  "the kernel is wrong: expected .* the largest difference"),
    "swapped": (lambda *a: solutions.fold_conv_bn(*a)[::-1], "swapped"),
    "kernel only": (lambda *a: solutions.fold_conv_bn(*a)[0], "return a pair"),
    "bias with the kernel's rank": (lambda *a: (solutions.fold_conv_bn(*a)[0],
                                                solutions.fold_conv_bn(*a)[1][None, None, None]),
                                    "wrong bias shape"),
    "kernel flattened": (lambda *a: (solutions.fold_conv_bn(*a)[0].reshape(-1),
                                     solutions.fold_conv_bn(*a)[1]),
                         "wrong kernel shape"),
    "no return": (lambda *a: None, "returned None: did you forget the `return`"),
    "a pair with None": (lambda *a: (solutions.fold_conv_bn(*a)[0], None), "the bias .* is None"),
}


@pytest.mark.parametrize("mistake", FOLD_MISTAKES)
def test_fold_conv_bn_names_the_mistake(mistake):
    answer, message = FOLD_MISTAKES[mistake]
    with pytest.raises(check.ExerciseError, match=message):
        checkers.fold_conv_bn(answer)


def test_fold_conv_bn_checks_the_folded_weights_as_a_convolution(monkeypatch):
    """The last stage runs conv(x, folded) against Conv2D -> BatchNormalization: a fold that matched
    a broken reference would still be caught there."""
    reference = folding.fold_conv_bn

    def off_by_one_in_the_bias(*args):   # right on the 1x1 case by hand, wrong on every 3x3 kernel
        kernel, bias = reference(*args)
        return kernel, bias + (1.0 if kernel.shape[0] > 1 else 0.0)
    monkeypatch.setattr(folding, "fold_conv_bn", off_by_one_in_the_bias)
    with pytest.raises(check.ExerciseError, match="conv\\(x, your kernel\\) \\+ your bias differs"):
        checkers.fold_conv_bn(off_by_one_in_the_bias)


def test_fold_case_by_hand_is_what_labkit_computes_and_its_mistakes_differ():
    kernel = np.array([[[[1.0, 2.0], [3.0, 4.0]]]], np.float32)
    params = [np.array(p, np.float32)
              for p in ([0.5, 1.0], [4.0, 3.0], [1.0, 0.0], [1.0, -1.0], [3.0, 8.0])]
    new_kernel, new_bias = folding.fold_conv_bn(kernel, *params, 1.0)
    np.testing.assert_allclose(new_kernel, [[[[2.0, 2.0], [6.0, 4.0]]]])
    np.testing.assert_allclose(new_bias, [0.0, 2.0])
    for mistakes, right in zip(checkers._fold_mistakes(kernel, *params, 1.0),
                               (new_kernel, new_bias)):
        results = [np.asarray(wrong(), np.float64) for _, wrong in mistakes]
        for i, a in enumerate(results):
            assert not np.allclose(a, right)
            assert all(not np.allclose(a, b) for b in results[i + 1:])


# ----------------------------------------------------------------------------- both

@pytest.mark.parametrize("name", ["batchnorm_inference", "fold_conv_bn"])
def test_blanks_are_not_attempted(name, capsys):
    def raises(*args):
        raise NotImplementedError

    def ellipsis(*args):
        ...
        return ...
    for blank in (raises, ellipsis):
        getattr(checkers, name)(blank)
        assert f"○ {name}: not attempted" in capsys.readouterr().out
        assert check.STATUS[name] == "not attempted"


@pytest.mark.parametrize("name", ["batchnorm_inference", "fold_conv_bn"])
def test_checkers_are_fast_and_registered_for_notebook_05(name, capsys):
    # warm: the first call builds TensorFlow's kernels
    getattr(checkers, name)(getattr(solutions, name))
    start = time.perf_counter()
    getattr(checkers, name)(getattr(solutions, name))
    assert time.perf_counter() - start < 2.0
    assert check.EXERCISES[name].notebook == "05"


def test_importing_the_checkers_does_not_import_tensorflow():
    code = "import sys, labkit.check.graph; print('tensorflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(ROOT))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
