"""Checkers for the search's exercises: the best low-rank approximation, the distillation loss.

References: `lowrank.svd_factors` (Eckart-Young: keep the largest singular values) and
`distill.distillation_loss` averaged over the batch (Keras's distillation example:
alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T)). Both modules load
TensorFlow, so they are imported inside the checkers, never when this module is imported.
"""
from __future__ import annotations

import numpy as np

from labkit.check import exercise, fail

RTOL, ATOL = 1e-4, 1e-5   # float32 arithmetic, done in any order, lands well inside this


def _close(got, expected) -> bool:
    return np.shape(got) == np.shape(expected) \
        and bool(np.allclose(got, expected, rtol=RTOL, atol=ATOL))


def _show(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    if values.size <= 12:
        return np.array2string(values, precision=4, separator=", ",
                               suppress_small=True).replace("\n", "")
    return f"an array of shape {values.shape}"


# ----------------------------------------------------------------------------- low_rank

def _svd_mistakes(weights, rank) -> list:
    """(diagnosis, a @ b as that mistake computes it) for the typical wrong factorizations."""
    u, s, vt = np.linalg.svd(np.asarray(weights, np.float64), full_matrices=False)
    r = rank
    return [
        ("you kept the SMALLEST singular values: np.linalg.svd sorts "
         "them largest first, so keep the first `rank` columns of U, "
         "values of S and rows of V^T", (u[:, -r:] * s[-r:]) @ vt[-r:]),
        ("you forgot the singular values S: a @ b must be U_r S_r V_r^T (put S, "
         "or sqrt(S), into a or b)",
         u[:, :r] @ vt[:r]),
        ("S is counted twice: put S into a OR b (or sqrt(S) into each), not S into both",
         (u[:, :r] * s[:r] ** 2) @ vt[:r]),
        ("only sqrt(S) made it into the product: with sqrt(S) in a, b needs the other sqrt(S) too",
         (u[:, :r] * np.sqrt(s[:r])) @ vt[:r]),
        ("you divided by the singular values instead of multiplying by them",
         (u[:, :r] / s[:r]) @ vt[:r] if np.all(s[:r] > 0) else None),
    ]


def _factors(name: str, value, m: int, n: int, rank: int, args) -> tuple[np.ndarray, np.ndarray]:
    """The learner's (a, b) as float64 arrays of shapes (m, rank) and
    (rank, n), or an ExerciseError."""
    if value is None:
        fail(name, "your function returned None: did you forget the `return`?", args)
    if isinstance(value, np.ndarray) and value.ndim == 2:
        fail(name, f"you returned one matrix of shape {value.shape}; return the pair (a, b), whose "
                   "product a @ b is the approximation", args)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        count = f"{len(value)} things" if isinstance(value, (tuple, list)) else type(value).__name__
        three = isinstance(value, (tuple, list)) and len(value) == 3
        hint = " (U, S and V^T? fold S into a or b)" if three else ""
        fail(name, f"return two matrices (a, b), got {count}{hint}", args)
    try:
        a, b = (np.asarray(x, dtype=np.float64) for x in value)
    except (TypeError, ValueError):
        fail(name, f"a and b must be arrays of numbers, got {type(value[0]).__name__} and "
                   f"{type(value[1]).__name__}",
             args)
    full = min(m, n)
    if a.shape == (m, rank) and b.shape == (rank, n):
        return a, b
    if a.shape == (m, rank) and b.shape == (n, rank):
        fail(name, f"b has shape {b.shape}, expected ({rank}, {n}): transpose it (np.linalg.svd "
                   "returns V^T, whose first `rank` ROWS you need)", args)
    if a.shape == (m, full) and b.shape == (full, n) and rank != full:
        fail(name, f"no truncation: a is {a.shape} and b {b.shape}, the full SVD; keep only the "
                   f"first {rank} columns of a and rows of b", args)
    if a.ndim == 2 and b.ndim == 2 and a.shape[0] == m and b.shape[1] == n \
            and a.shape[1] == b.shape[0]:
        kept = a.shape[1]
        fail(name, f"rank off by {kept - rank:+d}: a is {a.shape} and b {b.shape}, expected ({m}, "
                   f"{rank}) and ({rank}, {n}) (slicing [:rank] keeps exactly `rank` values)", args)
    if a.shape == (n, rank) and b.shape == (rank, m):
        fail(name, f"a is {a.shape} and b {b.shape}: that factors the transposed matrix; a must "
                   f"have one row per row of weights ({m}) and b one column per column ({n})", args)
    fail(name, f"wrong shapes: expected a of shape ({m}, {rank}) and b of shape ({rank}, {n}), "
               f"got {a.shape} and {b.shape}", args)


def _check_low_rank(call, weights, rank, svd_factors, by_hand=None) -> None:
    name = "low_rank"
    args = (weights, rank)
    m, n = weights.shape
    a, b = _factors(name, call(weights.copy(), rank), m, n, rank, args)
    product = a @ b
    ref_a, ref_b = svd_factors(weights, rank)
    expected = (np.asarray(ref_a, np.float64) @ np.asarray(ref_b, np.float64) if by_hand is None
                else by_hand)
    w = np.asarray(weights, np.float64)
    s = np.linalg.svd(w, compute_uv=False)
    best_error = float(np.sqrt(np.sum(s[rank:] ** 2)))  # Eckart-Young: what no rank-r product beats
    error = float(np.linalg.norm(w - product))
    scale = max(1.0, float(np.linalg.norm(w)))
    if not np.all(np.isfinite(product)):
        fail(name, "a @ b holds NaN or infinite values (a division by a zero singular value?)",
             args)
    if _close(product, expected) or abs(error - best_error) <= 1e-5 * scale:
        return   # the best approximation (several are equally good only when singular values tie)
    for message, wrong in _svd_mistakes(w, rank):
        if wrong is not None and _close(product, wrong):
            fail(name, message, args)
    where = (f"expected a @ b = {_show(expected)}, got {_show(product)}; " if product.size <= 12
             else "")
    fail(name, f"a @ b is not the best rank-{rank} approximation: {where}its error ||W - a @ b|| "
               f"is {error:.4g}, the best possible is {best_error:.4g} (keep the {rank} largest "
               "singular values: a = U[:, :r] * S[:r], b = Vt[:r])", args)


@exercise("low_rank", "08", "lowrank.svd_factors",
          "low_rank(weights, rank) -> (a, b), shapes (m, rank) and (rank, n), a @ b the "
          "best rank-r approximation")
def low_rank(call):
    """4 matrices by hand (a diagonal one at ranks 1 and 2, a rank-1 outer product, a 2 x 3 one),
    then 30 random matrices (float32 and float64, tall and wide, every rank up to full) against
    lowrank.svd_factors; any split of the singular values between a and b is right."""
    # imported here: labkit.check itself loads without TensorFlow
    from labkit.lowrank import svd_factors
    diagonal = np.diag([3.0, 2.0, 1.0])
    by_hand = [
        (diagonal, 1, np.diag([3.0, 0.0, 0.0])),   # keep the largest singular value, 3
        (diagonal, 2, np.diag([3.0, 2.0, 0.0])),
        # already rank 1
        (np.outer([1.0, 2.0], [3.0, 4.0, 5.0]), 1, np.outer([1.0, 2.0], [3.0, 4.0, 5.0])),
        (np.array([[0.0, 5.0, 0.0], [1.0, 0.0, 0.0]]), 1,
         np.array([[0.0, 5.0, 0.0], [0.0, 0.0, 0.0]])),
    ]
    for weights, rank, expected in by_hand:
        _check_low_rank(call, weights, rank, svd_factors, by_hand=expected)
    rng = np.random.default_rng(8)
    for k in range(30):
        m, n = (int(v) for v in rng.integers(2, 13, size=2))
        rank = int(rng.integers(1, min(m, n) + 1))
        weights = rng.normal(0, 1, (m, n)).astype(np.float32 if k % 2 else np.float64)
        _check_low_rank(call, weights, rank, svd_factors)
    return f"{len(by_hand)} matrices by hand, 30 random ones against lowrank.svd_factors"


# ----------------------------------------------------------------------------- distillation_loss

def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _terms(student, teacher, labels, temperature) -> dict:
    """Per-image pieces of the loss and of its typical misreadings (NumPy, float64)."""
    rows = np.arange(len(labels))
    log_s, log_s_t = _log_softmax(student), _log_softmax(np.asarray(student) / temperature)
    log_t, log_t_t = _log_softmax(teacher), _log_softmax(np.asarray(teacher) / temperature)
    p_t_t, p_s_t = np.exp(log_t_t), np.exp(log_s_t)
    return {"ce": -log_s[rows, labels],                                  # the labels, at T = 1
            "ce_soft": -log_s_t[rows, labels],                           # the labels, at T
            "kl": np.sum(p_t_t * (log_t_t - log_s_t), axis=1),   # KL(teacher_T || student_T)
            # KL(student_T || teacher_T)
            "kl_reversed": np.sum(p_s_t * (log_s_t - log_t_t), axis=1),
            "kl_teacher_hot": np.sum(np.exp(log_t) * (log_t - log_s_t), axis=1),  # teacher at T = 1
            "kl_both_hot": np.sum(np.exp(log_t) * (log_t - log_s), axis=1),  # no temperature at all
            "soft_ce": -np.sum(p_t_t * log_s_t, axis=1)}   # cross-entropy with soft targets


def numpy_distillation_loss(student, teacher, labels, temperature, alpha) -> float:
    """The definition, in NumPy: alpha * mean CE(labels) + (1 - alpha) * T^2 * mean
    KL(teacher_T || student_T)."""
    t = _terms(student, teacher, labels, temperature)
    return float(alpha * t["ce"].mean() + (1 - alpha) * temperature ** 2 * t["kl"].mean())


def _loss_mistakes(student, teacher, labels, temperature, alpha) -> list:
    """(diagnosis, what that mistake returns) for the typical wrong distillation losses."""
    t = {k: v.mean() for k, v in _terms(student, teacher, labels, temperature).items()}
    total = {k: v.sum() for k, v in _terms(student, teacher, labels, temperature).items()}
    a, tt = alpha, temperature ** 2
    return [
        ("you forgot the T^2 on the soft term: (1 - alpha) * T**2 * KL (without it the soft term's "
         "gradients shrink as 1/T^2)", a * t["ce"] + (1 - a) * t["kl"]),
        ("the soft term is multiplied by T, not T**2",
         a * t["ce"] + (1 - a) * temperature * t["kl"]),
        ("alpha is on the wrong term: alpha weighs the labels' cross-entropy, (1 - alpha) the "
         "teacher's KL (Keras's convention)", (1 - a) * t["ce"] + a * tt * t["kl"]),
        ("you softened the label term too: the cross-entropy with the "
         "labels uses the student's logits at temperature 1, only the KL "
         "uses logits / T", a * t["ce_soft"] + (1 - a) * tt * t["kl"]),
        ("the KL is reversed: KL(teacher_T || student_T) = sum p_teacher "
         "* (log p_teacher - log p_student), the teacher's probabilities "
         "weigh it", a * t["ce"] + (1 - a) * tt * t["kl_reversed"]),
        ("you summed over the batch instead of averaging: both terms are means over the images",
         a * total["ce"] + (1 - a) * tt * total["kl"]),
        ("the label term is summed over the batch, the KL averaged: average both",
         a * total["ce"] + (1 - a) * tt * t["kl"]),
        ("the KL is summed over the batch, the label term averaged: average both",
         a * t["ce"] + (1 - a) * tt * total["kl"]),
        ("you used the cross-entropy with the teacher's soft targets instead of the KL divergence: "
         "they differ by the teacher's entropy (same gradients, different value); subtract sum "
         "p_teacher * log p_teacher",
         a * t["ce"] + (1 - a) * tt * t["soft_ce"]),
        ("only the student's logits were divided by T: soften the teacher's too, "
         "softmax(teacher_logits / T)",
         a * t["ce"] + (1 - a) * tt * t["kl_teacher_hot"]),
        ("the temperature is missing from the softmaxes: KL(softmax(teacher / T) "
         "|| softmax(student / T))",
         a * t["ce"] + (1 - a) * tt * t["kl_both_hot"]),
        ("you averaged the KL over the classes: sum over the classes, then average over the images",
         a * t["ce"] + (1 - a) * tt * t["kl"] / np.shape(student)[1]),
        ("T**2 multiplies the label term too: only the soft term gets T**2",
         tt * (a * t["ce"] + (1 - a) * t["kl"])),
        ("you forgot the (1 - alpha) weight on the soft term", a * t["ce"] + tt * t["kl"]),
        ("you forgot the alpha weight on the label term", t["ce"] + (1 - a) * tt * t["kl"]),
    ]


def _as_float(name: str, value, n: int, args) -> float:
    if value is None:
        fail(name, "your function returned None: did you forget the `return`?", args)
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        fail(name, f"return one number, got {type(value).__name__}: {value!r:.80}", args)
    if array.size != 1:
        per_image = " (one loss per image? average over the batch)" if array.shape == (n,) else ""
        fail(name, "return one number, the batch's mean loss; got an array of shape "
                   f"{array.shape}{per_image}", args)
    return float(array.reshape(()))


def _run_loss(call, student, teacher, labels, temperature, alpha, expected, how) -> dict:
    """One case: the learner's loss beside the expected one and every typical mistake's."""
    name = "distillation_loss"
    args = (student, teacher, labels, temperature, alpha)
    got = _as_float(name, call(student.copy(), teacher.copy(), labels.copy(), temperature, alpha),
                    len(labels), args)
    if not np.isfinite(got):
        fail(name, f"the loss is {got}: a log of 0 or a softmax that overflowed? subtract each "
                   "row's max from the logits before np.exp (a log-softmax)", args)
    return {"args": args, "got": got, "expected": expected, "how": how,
            "mistakes": _loss_mistakes(student, teacher, labels, temperature, alpha)}


def _judge_loss(cases: list) -> None:
    """Pass, or name the mistake that explains every case (else the one that
    explains every wrong case)."""
    wrong = [c for c in cases if not _close(c["got"], c["expected"])]
    if not wrong:
        return
    first = wrong[0]
    example = f"Expected {first['expected']:.6g} ({first['how']}), got {first['got']:.6g}"
    for among in (cases, wrong):
        for k, (message, _) in enumerate(first["mistakes"]):
            if all(_close(c["got"], c["mistakes"][k][1]) for c in among):
                fail("distillation_loss", f"{message}. {example}", first["args"])
    fail("distillation_loss", f"{example}. The loss is alpha * mean CE(labels, softmax(s)) "
                              "+ (1 - alpha) * T**2 * mean KL(softmax(t / T) || softmax(s / T))",
         first["args"])


LN3 = float(np.log(3.0))


@exercise("distillation_loss", "08", "distill.distillation_loss",
          "distillation_loss(student_logits, teacher_logits, labels, temperature, alpha) -> "
          "float, the batch's mean")
def distillation_loss(call):
    """4 cases by hand (two classes, T = 2: log 2, 0, 4 * 0.5 * ln(4/3) and a half-half mix), then
    24 random batches (3 or 10 classes, T from 1 to 8, alpha from 0 to 1) against
    distill.distillation_loss averaged over the batch, and against the same definition in NumPy."""
    # imported here: labkit.check itself loads without TensorFlow
    from labkit import distill
    f32 = np.float32
    # By hand, two classes, T = 2. Student (2 ln 3, 0): softmax at T = 1 is (0.9, 0.1),
    # at T = 2 (0.75, 0.25). Teacher (0, 0): (0.5, 0.5) at any T. KL = 0.5 ln(0.5/0.75) +
    # 0.5 ln(0.5/0.25) = 0.5 ln(4/3).
    s, t, y = np.array([[2 * LN3, 0.0]], f32), np.zeros((1, 2), f32), np.array([0])
    kl = 0.5 * np.log(4 / 3)
    by_hand = [
        (np.zeros((1, 2), f32), t, y, 2.0, 1.0, np.log(2.0),
         "by hand: labels only, CE = -ln 0.5 = ln 2"),
        (s, s.copy(), y, 2.0, 0.0, 0.0, "by hand: teacher only, and the student "
                                        "copies the teacher: KL = 0"),
        (s, t, y, 2.0, 0.0, 4 * kl, "by hand: teacher only, T^2 * KL = 4 * 0.5 * ln(4/3)"),
        (s, t, y, 2.0, 0.5, 0.5 * -np.log(0.9) + 0.5 * 4 * kl, "by hand: 0.5 * -ln 0.9 + "
                                                               "0.5 * 4 * 0.5 * ln(4/3)"),
    ]
    cases = [_run_loss(call, student, teacher, labels, temperature, alpha, float(expected), how)
             for student, teacher, labels, temperature, alpha, expected, how in by_hand]
    rng = np.random.default_rng(14)
    temperatures, alphas = (1.0, 2.0, 3.0, 4.0, 8.0, 1.5), (0.0, 0.1, 0.25, 0.5, 0.9, 1.0, 0.3)
    for k in range(24):
        n, classes = int(rng.integers(2, 9)), (3, 10)[k % 2]
        student = (2 * rng.standard_normal((n, classes))).astype(f32)
        teacher = (3 * rng.standard_normal((n, classes))).astype(f32)
        labels = rng.integers(0, classes, n)
        temperature, alpha = temperatures[k % len(temperatures)], alphas[k % len(alphas)]
        loss = distill.distillation_loss(labels, teacher, student, temperature, alpha)
        reference = float(np.mean(loss.numpy()))
        numpy_loss = numpy_distillation_loss(student, teacher, labels, temperature, alpha)
        assert abs(reference - numpy_loss) < 1e-4
        cases.append(_run_loss(call, student, teacher, labels, temperature, alpha, reference,
                               "distill.distillation_loss, averaged over the batch"))
    _judge_loss(cases)
    return f"{len(by_hand)} cases by hand, 24 random batches against distill.distillation_loss"
