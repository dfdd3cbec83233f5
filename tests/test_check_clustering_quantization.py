"""The checkers of notebooks 03 and 04: kmeans_step, codebook_bytes, affine_params, int8_dense.

Each must pass the book's solution, another correct implementation written differently, and labkit's
own reference; report a blank as not attempted; and reject each typical wrong answer with a message
that names the mistake.
"""
import math
import subprocess
import sys

import numpy as np
import pytest

import labkit.check.clustering as cc
import labkit.check.quantization as cq
import labkit.check.solutions as solutions
from labkit import ROOT, check, kmeans, quantizers, tflite

CHECKERS = {"kmeans_step": cc.kmeans_step, "codebook_bytes": cc.codebook_bytes,
            "affine_params": cq.affine_params, "int8_dense": cq.int8_dense}


def passes(name, fn, capsys):
    CHECKERS[name](fn)
    assert f"✓ {name}: correct" in capsys.readouterr().out


def fails(name, fn, match):
    with pytest.raises(check.ExerciseError, match=match):
        CHECKERS[name](fn)


# ----------------------------------------------------------------------------- right answers

def kmeans_step_loops(weights, centroids):
    """Plain Python loops, squared distances, float32 centroids and labels as a list."""
    weights = [float(w) for w in np.ravel(weights)]
    centroids = [float(c) for c in centroids]
    labels = []
    for w in weights:
        distances = [(w - c) ** 2 for c in centroids]
        labels.append(distances.index(min(distances)))
    new = []
    for j, c in enumerate(centroids):
        members = [w for w, label in zip(weights, labels) if label == j]
        new.append(sum(members) / len(members) if members else c)
    return labels, np.array(new, np.float32)


def kmeans_step_labkit(weights, centroids):
    """labkit's own pieces: kmeans.assign on the sorted centroids, one
    iteration of kmeans.kmeans."""
    centroids = np.asarray(centroids, np.float64)
    order = np.argsort(centroids)
    labels = order[kmeans.assign(np.ravel(weights), centroids[order])]
    new = np.empty(len(centroids))
    new[order] = kmeans.kmeans(np.ravel(weights), len(centroids), iterations=1,
                               centroids=centroids).centroids
    return labels, new


def codebook_bytes_loops(num_weights, clusters):
    bits = 1
    while 2 ** bits < clusters:
        bits += 1
    return np.int64(clusters * 4 + (num_weights * bits + 7) // 8)


def codebook_bytes_labkit(num_weights, clusters):
    return kmeans.Codebook(np.zeros(clusters, np.float32), np.zeros(num_weights, np.uint16),
                           []).storage_bytes()


def affine_params_float32(x, bits):
    """float32 arithmetic, the zero point from the top of the range, a NumPy
    scalar and a 0-d array out."""
    x = np.asarray(x, np.float32)
    qmin, qmax = np.float32(-2 ** (bits - 1)), np.float32(2 ** (bits - 1) - 1)
    lo, hi = np.minimum(x.min(), np.float32(0)), np.maximum(x.max(), np.float32(0))
    scale = (hi - lo) / (qmax - qmin)
    return scale, np.array(np.clip(np.rint(qmax - hi / scale), qmin, qmax).astype(np.int32))


def affine_params_labkit(x, bits):
    p = quantizers.affine_params(x, bits)
    return float(p.scale), int(p.zero_point)


def int8_dense_loops(x_q, x_scale, x_zero_point, w_q, w_scale, b_q, y_scale, y_zero_point):
    """Python integers (never overflow) and rounding half away from
    zero, as TFLite's kernels round."""
    batch, n_in, n_out = len(x_q), len(w_q), len(w_q[0])
    scales = np.broadcast_to(np.asarray(w_scale, np.float64), (n_out,))
    y = np.zeros((batch, n_out), np.int8)
    for i in range(batch):
        for j in range(n_out):
            acc = int(b_q[j]) + sum((int(x_q[i][k]) - int(x_zero_point)) * int(w_q[k][j])
                                    for k in range(n_in))
            real = acc * x_scale * scales[j] / y_scale
            code = int(math.copysign(math.floor(abs(real) + 0.5), real)) + int(y_zero_point)
            y[i, j] = min(127, max(-128, code))
    return y


def int8_dense_float(x_q, x_scale, x_zero_point, w_q, w_scale, b_q, y_scale, y_zero_point):
    """Dequantize, compute in float64, quantize the result: the same numbers, another road."""
    x = x_scale * (x_q.astype(np.float64) - x_zero_point)
    w = w_q.astype(np.float64) * np.asarray(w_scale)
    y = x @ w + b_q * (x_scale * np.asarray(w_scale))
    return np.clip(np.round(y / y_scale) + y_zero_point, -128, 127).astype(np.int16)


def int8_dense_labkit(x_q, x_scale, x_zero_point, w_q, w_scale, b_q, y_scale, y_zero_point):
    """quantizers.dequantize the inputs and weights, quantizers.quantize the float result."""
    x_p = quantizers.QuantParams(np.float32(x_scale), np.int64(x_zero_point), -128, 127, 8)
    w_p = quantizers.QuantParams(np.asarray(w_scale, np.float32),
                                 np.zeros(np.shape(w_scale), np.int64), -127, 127, 8,
                                 axis=1 if np.ndim(w_scale) else None)
    y = (quantizers.dequantize(x_q, x_p).astype(np.float64)
         @ quantizers.dequantize(w_q, w_p).astype(np.float64))
    y += b_q * (float(x_scale) * np.asarray(w_scale, np.float64))
    y_p = quantizers.QuantParams(np.float32(y_scale), np.int64(y_zero_point), -128, 127, 8)
    return quantizers.quantize(y, y_p)


RIGHT = {
    "kmeans_step": [solutions.kmeans_step, kmeans_step_loops, kmeans_step_labkit],
    "codebook_bytes": [solutions.codebook_bytes, codebook_bytes_loops, codebook_bytes_labkit],
    "affine_params": [solutions.affine_params, affine_params_float32, affine_params_labkit],
    "int8_dense": [solutions.int8_dense, int8_dense_loops, int8_dense_float, int8_dense_labkit],
}


@pytest.mark.parametrize("name, fn", [(name, fn) for name, fns in RIGHT.items() for fn in fns],
                         ids=lambda v: getattr(v, "__name__", v))
def test_right_answers_pass(name, fn, capsys):
    passes(name, fn, capsys)


@pytest.mark.parametrize("name", CHECKERS)
def test_a_blank_is_not_attempted(name, capsys):
    def raises(*args):
        raise NotImplementedError

    def ellipsis(*args):
        return ...
    for blank in (raises, ellipsis):
        CHECKERS[name](blank)
        assert f"○ {name}: not attempted" in capsys.readouterr().out


# ----------------------------------------------------------------------- kmeans_step: wrong answers

def _kmeans(labels_of=None, update=None, sort=False, empty=None, relabel=False):
    """The solution with one thing changed."""
    def step(weights, centroids):
        weights, centroids = np.ravel(weights), np.asarray(centroids, dtype=float)
        if sort:
            centroids = np.sort(centroids)
        nearest = labels_of or (lambda w, c: np.argmin(np.abs(w[:, None] - c[None, :]), axis=1))
        labels = nearest(weights, centroids)
        new = centroids.copy()
        for j in range(len(centroids)):
            members = weights[labels == j]
            if members.size:
                new[j] = (update or np.mean)(members)
            elif empty is not None:
                new[j] = empty
        if relabel:
            labels = np.argmin(np.abs(weights[:, None] - new[None, :]), axis=1)
        return labels, new
    return step


def kmeans_mutates(weights, centroids):
    labels = np.argmin(np.abs(weights[:, None] - centroids[None, :]), axis=1)
    new = centroids
    for j in range(len(centroids)):
        if np.any(labels == j):
            new[j] = weights[labels == j].mean()
    return labels, new


def _change(weights, centroids, labels=lambda labels: labels, new=lambda new: new):
    """The solution's answer with its labels or its new centroids changed."""
    right_labels, right_new = solutions.kmeans_step(weights, centroids)
    return labels(right_labels), new(right_new)


KMEANS_WRONG = [
    (_kmeans(labels_of=lambda w, c: np.argmin(w[:, None] - c[None, :], axis=1)),
     "signed difference w - c"),
    (_kmeans(labels_of=lambda w, c: np.argmin(c[None, :] - w[:, None], axis=1)),
     "signed difference c - w"),
    (_kmeans(labels_of=lambda w, c: np.argmax(np.abs(w[:, None] - c[None, :]), axis=1)),
     "farthest centroid"),
    (_kmeans(labels_of=lambda w, c: np.argmin(np.abs(w[:, None] - c[None, :]), axis=1) + 1),
     "start at 1"),
    (_kmeans(empty=0.0), "empty cluster's centroid became 0"),
    (_kmeans(empty=np.nan), "NaN"),
    (_kmeans(relabel=True), "nearest of the NEW centroids"),
    (_kmeans(sort=True), "you sorted the centroids"),
    (lambda w, c: _change(w, c, new=np.sort), "new centroids are sorted"),
    (_kmeans(update=np.sum), "SUM of their weights"),
    (_kmeans(update=np.median), "median"),
    (lambda w, c: _change(w, c, new=lambda new: np.asarray(c)), "returned the centroids unchanged"),
    (lambda w, c: solutions.kmeans_step(w, solutions.kmeans_step(w, c)[1]),
     "moved the centroids twice|NEW centroids"),
    (kmeans_mutates, "changed the centroids it was given"),
    (lambda w, c: solutions.kmeans_step(w, c)[0], "return two things"),
    (lambda w, c: _change(w, c, labels=lambda labels: np.eye(len(c))[labels]),
     "labels should have shape"),
    (lambda w, c: _change(w, c, labels=lambda labels: np.asarray(c)[labels]), "whole numbers"),
    (lambda w, c: _change(w, c, new=lambda new: new[:-1]), "new_centroids should have shape"),
]


@pytest.mark.parametrize("fn, match", KMEANS_WRONG, ids=[m for _, m in KMEANS_WRONG])
def test_kmeans_step_names_the_mistake(fn, match):
    fails("kmeans_step", fn, match)


def test_kmeans_step_cases_by_hand_are_what_the_markdown_says():
    labels, new = cc.reference_step([0.1, 0.2, 0.9, 1.1], [0.0, 1.0])
    assert labels.tolist() == [0, 0, 1, 1] and np.allclose(new, [0.15, 1.0])
    labels, new = cc.reference_step([-1.0, -0.8, 0.1, 0.3, 2.0], [2.5, -1.0, 0.0])
    assert labels.tolist() == [1, 1, 2, 2, 0] and np.allclose(new, [2.0, -0.9, 0.2])
    labels, new = cc.reference_step([0.0, 0.2, 0.4], [0.1, 5.0])
    assert labels.tolist() == [0, 0, 0] and np.allclose(new, [0.2, 5.0])


def test_kmeans_step_reference_is_one_iteration_of_labkits_kmeans():
    rng = np.random.default_rng(0)
    for weights, centroids in cc._kmeans_cases(rng, 20):
        _, new = cc.reference_step(weights, centroids)
        one = kmeans.kmeans(weights, len(centroids), iterations=1, centroids=centroids)
        assert np.allclose(np.sort(new), one.centroids, rtol=1e-6,
                           atol=1e-6 * np.abs(weights).max())


# -------------------------------------------------------------------- codebook_bytes: wrong answers

CODEBOOK_WRONG = [
    (lambda n, k: k * 32 + n * max(1, math.ceil(math.log2(k))), "bits, not bytes"),
    (lambda n, k: math.ceil(n * max(1, math.ceil(math.log2(k))) / 8), "forgot the codebook"),
    (lambda n, k: k * 4 + n, "one byte \\(8 bits\\) per index"),
    (lambda n, k: k * 4 + math.ceil(n * math.log2(k) / 8),
     "did not round log2\\(k\\) up|0 index bits"),
    (lambda n, k: k * 4 + math.ceil(n * max(1, int(math.log2(k))) / 8), "rounded log2\\(k\\) down"),
    (lambda n, k: k * 4 + n * max(1, math.ceil(math.log2(k))) // 8, "round UP to whole bytes"),
    (lambda n, k: k * 4 + n * max(1, math.ceil(math.log2(k))) / 8, "rounded up to a whole number"),
    (lambda n, k: k * 8 + math.ceil(n * max(1, math.ceil(math.log2(k))) / 8), "float64"),
    (lambda n, k: k * 4 + math.ceil(n * math.ceil(math.log2(k)) / 8), "0 index bits"),
    (lambda n, k: k * 4 + math.ceil(n * (int(math.log2(k)) + 1) / 8), "log2\\(k\\) \\+ 1 bits"),
    (lambda n, k: f"{k * 4 + math.ceil(n * max(1, math.ceil(math.log2(k))) / 8)} B",
     "return one number"),
]


@pytest.mark.parametrize("fn, match", CODEBOOK_WRONG, ids=[m for _, m in CODEBOOK_WRONG])
def test_codebook_bytes_names_the_mistake(fn, match):
    fails("codebook_bytes", fn, match)


def test_codebook_bytes_by_hand():
    assert [cc.reference_bytes(n, k) for n, k in cc._CODEBOOK_BY_HAND] == \
        [114, 200_768, 58, 10, 2024, 2153, 5]


# --------------------------------------------------------------------- affine_params: wrong answers

def _affine(widen=True, steps=lambda b: 2 ** b - 1, offset=0, rounding=round, clip=True,
            swap=False):
    def params(x, bits):
        qmin, qmax = -2 ** (bits - 1) + offset, 2 ** (bits - 1) - 1 + offset
        lo, hi = float(np.min(x)), float(np.max(x))
        if widen:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = (hi - lo) / steps(bits)
        zero_point = rounding(qmin - lo / scale)
        if clip:
            zero_point = int(np.clip(zero_point, qmin, qmax))
        return (zero_point, scale) if swap else (scale, zero_point)
    return params


def affine_symmetric(x, bits):
    return float(np.max(np.abs(x))) / (2 ** (bits - 1) - 1), 0


def affine_sign_flipped(x, bits):
    scale = _affine()(x, bits)[0]
    return scale, int(round(-2 ** (bits - 1) + min(float(np.min(x)), 0.0) / scale))


AFFINE_WRONG = [
    (_affine(widen=False), "widen it to include 0"),
    (_affine(widen=False, clip=False), "widen it to include 0"),
    (_affine(steps=lambda b: 2 ** b), "divided the range by 2\\*\\*bits"),
    (_affine(offset=2 ** 7), "unsigned codes"),
    (lambda x, bits: _affine(offset=2 ** (bits - 1))(x, bits), "unsigned codes"),
    (_affine(rounding=lambda v: v, clip=False), "not rounded"),
    (_affine(rounding=math.floor), "rounded down"),
    (_affine(rounding=math.ceil), "rounded up"),
    (_affine(swap=True), "you returned \\(zero_point, scale\\)"),
    (affine_symmetric, "symmetric, not asymmetric"),
    (affine_sign_flipped, "sign of lo / scale"),
    (lambda x, bits: _affine()(x, 8), "8 bits whatever"),
    (lambda x, bits: _affine()(x, bits)[0], "return two numbers"),
]


@pytest.mark.parametrize("fn, match", AFFINE_WRONG, ids=[m for _, m in AFFINE_WRONG])
def test_affine_params_names_the_mistake(fn, match):
    fails("affine_params", fn, match)


def test_affine_params_by_hand():
    got = [cq.quantizers.affine_params(np.array(x, np.float32), bits)
           for x, bits in cq._AFFINE_BY_HAND]
    assert [int(p.zero_point) for p in got] == [-43, -128, -3, 127, -1]
    assert np.allclose([float(p.scale) for p in got], [3 / 255, 0.01, 2.6 / 15, 2 / 255, 0.5])


# ------------------------------------------------------------------------ int8_dense: wrong answers

def _dense(forget_x_zero=False, accumulate=np.int32, bias_after=False, forget_y_zero=False,
           clamp=True,
           transpose=False, rounding=np.round,
           multiplier=lambda xs, ws, ys: xs * np.asarray(ws) / ys, cast=np.int8):
    def dense(x_q, x_scale, x_zero_point, w_q, w_scale, b_q, y_scale, y_zero_point):
        x = x_q.astype(accumulate) - (0 if forget_x_zero else x_zero_point)
        w = w_q.astype(accumulate).T if transpose else w_q.astype(accumulate)
        acc = (x @ w).astype(np.int64)
        m = multiplier(x_scale, w_scale, y_scale)
        y = rounding(acc * m) + b_q if bias_after else rounding((acc + b_q) * m)
        y = y + (0 if forget_y_zero else y_zero_point)
        if clamp:
            y = np.clip(y, -128, 127)
        return y.astype(cast) if cast else y
    return dense


def int8_dense_scalar_scale(x_q, x_scale, x_zero_point, w_q, w_scale, b_q, y_scale, y_zero_point):
    acc = (x_q.astype(np.int32) - x_zero_point) @ w_q.astype(np.int32) + b_q
    return np.clip(np.round(acc * (x_scale * float(w_scale) / y_scale)) + y_zero_point, -128,
                   127).astype(np.int8)


def int8_dense_first_scale(x_q, x_scale, x_zero_point, w_q, w_scale, b_q, y_scale, y_zero_point):
    return solutions.int8_dense(x_q, x_scale, x_zero_point, w_q, np.ravel(w_scale)[0], b_q, y_scale,
                                y_zero_point)


def int8_dense_reals(x_q, x_scale, x_zero_point, w_q, w_scale, b_q, y_scale, y_zero_point):
    acc = (x_q.astype(np.int32) - x_zero_point) @ w_q.astype(np.int32) + b_q
    return acc * x_scale * np.asarray(w_scale)


INT8_WRONG = [
    (_dense(forget_x_zero=True), "forgot the input zero point"),
    (_dense(accumulate=np.int8), "overflow"),
    (_dense(accumulate=np.int16), "overflow"),
    (_dense(bias_after=True), "bias after requantizing"),
    (_dense(forget_y_zero=True), "forgot the output zero point"),
    (_dense(clamp=False, cast=None), "clamp them to the int8 range"),
    (_dense(clamp=False), "wrapped around"),
    (_dense(transpose=True), "hint: x_q has shape \\(batch, in\\) and w_q \\(in, out\\)"),
    (_dense(rounding=np.trunc), "truncated instead of rounding"),
    (_dense(rounding=np.floor), "rounded down"),
    (_dense(multiplier=lambda xs, ws, ys: ys / (xs * np.asarray(ws))), "upside down"),
    (_dense(multiplier=lambda xs, ws, ys: xs * np.asarray(ws)), "did not divide by y_scale"),
    (lambda *args: np.clip(_dense(clamp=False, cast=None)(*args), -127, 127),
     "clamped to \\[-127, 127\\]"),
    (int8_dense_scalar_scale, "one scale per output channel"),
    (int8_dense_first_scale, "one weight scale for every output channel"),
    (int8_dense_reals, "returned real values"),
    (lambda *args: solutions.int8_dense(*args).T, "y_q should have shape"),
]


@pytest.mark.parametrize("fn, match", INT8_WRONG, ids=[m for _, m in INT8_WRONG])
def test_int8_dense_names_the_mistake(fn, match):
    fails("int8_dense", fn, match)


def test_int8_dense_square_kernel_transposed_is_named():
    case = cq._DENSE_BY_HAND[3]
    with pytest.raises(check.ExerciseError, match="transposed the kernel"):
        cq._judge_dense(check.guarded(_dense(transpose=True), "int8_dense"), case, "a case by hand")


def test_int8_dense_cases_by_hand_are_what_the_comments_say():
    assert [cq.reference_dense(*case).tolist() for case in cq._DENSE_BY_HAND] == [
        [[0, 11]], [[99], [-31]], [[127, -128, 10]], [[1, -1, -2], [-1, -1, -2]]]
    assert cq.reference_dense(*cq._DENSE_PER_CHANNEL).tolist() == [[21, 5], [-1, 2]]
    for case in [*cq._DENSE_BY_HAND, cq._DENSE_PER_CHANNEL]:   # no case sits on a tie
        real = cq.exact_output(case[0], case[2], case[3], case[4], case[5], case[1], case[6])
        assert np.all(np.abs(np.abs(real - np.floor(real)) - 0.5) > 0.01)


@pytest.mark.parametrize("per_channel", [False, True])
def test_the_converted_file_holds_what_the_checker_reads(per_channel, tmp_path):
    file = cq.converted_dense(per_channel)
    assert file["op"] == "FULLY_CONNECTED"
    assert file["w_q"].shape == cq.TINY_DENSE and file["w_q"].dtype == np.int8
    assert file["b_q"].dtype == np.int32
    assert np.ndim(file["w_scale"]) == (1 if per_channel else 0)
    path = tmp_path / "tiny.tflite"
    path.write_bytes(file["content"])
    tensors = tflite.tensors(path)
    bias = tensors[tensors["dtype"] == np.dtype(np.int32)].iloc[0]
    assert np.allclose(bias["scales"], file["x_scale"] * np.asarray(file["w_scale"]), rtol=1e-5)
    # the exact integer arithmetic and LiteRT's fixed-point kernel differ by at most one code
    rng = np.random.default_rng(1)
    x_q = rng.integers(-128, 128, (500, cq.TINY_DENSE[0])).astype(np.int8)
    ours = cq.reference_dense(x_q, file["x_scale"], file["x_zero_point"], file["w_q"],
                              file["w_scale"], file["b_q"],
                              file["y_scale"], file["y_zero_point"]).astype(int)
    theirs = cq.run_converted(file, x_q).astype(int)
    assert np.max(np.abs(ours - theirs)) <= 1 and np.mean(ours == theirs) > 0.99


def test_int8_dense_judges_the_converter_case_against_litert():
    file = cq.converted_dense(True)
    x_q = cq._converter_inputs(file, np.random.default_rng(2))
    args = (x_q, file["x_scale"], file["x_zero_point"], file["w_q"], file["w_scale"], file["b_q"],
            file["y_scale"], file["y_zero_point"])
    target = cq.run_converted(file, x_q)
    cq._judge_dense(check.guarded(solutions.int8_dense, "int8_dense"), args, "the converter's file",
                    target)

    def off_by_two(*given):
        y = solutions.int8_dense(*given).astype(np.int16)
        y[0, 0] = y[0, 0] + 2 if y[0, 0] < 120 else y[0, 0] - 2
        return y
    with pytest.raises(check.ExerciseError, match="1 of 128 codes are wrong \\(the "
                                                  "converter's file\\).*LiteRT gives"):
        cq._judge_dense(check.guarded(off_by_two, "int8_dense"), args, "the converter's file",
                        target)


def test_importing_the_quantization_checker_leaves_tensorflow_out():
    code = "import sys, labkit.check.quantization; print('tensorflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(ROOT))
    assert done.stdout.strip() == "False", done.stderr[-2000:]
