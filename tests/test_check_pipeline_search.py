"""Checkers of notebooks 07 and 08's exercises (labkit/check/pipeline.py, labkit/check/search.py):
dominates, pareto_front, low_rank and distillation_loss.

Each must accept every correct answer (the instructor's solution, one written differently here,
labkit's own) and reject the typical wrong ones with the message that names the mistake.
"""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

# the chapter modules themselves: no need to load every chapter
import labkit.check.pipeline as pipeline_checks
import labkit.check.search as search_checks
import labkit.check.solutions as solutions
from labkit import ROOT, results
from labkit.check import STATUS, ExerciseError


def blank(*args, **kwargs):
    raise NotImplementedError


def ellipsis(*args, **kwargs):
    return ...


def passes(checker, fn, capsys):
    checker(fn)
    out = capsys.readouterr().out
    assert out.startswith(f"✓ {checker.__name__}: correct"), out


@pytest.mark.parametrize("checker", [pipeline_checks.dominates, pipeline_checks.pareto_front,
                                     search_checks.low_rank, search_checks.distillation_loss])
@pytest.mark.parametrize("fn", [blank, ellipsis])
def test_blank_is_not_attempted(checker, fn, capsys):
    checker(fn)
    assert f"○ {checker.__name__}: not attempted" in capsys.readouterr().out
    assert STATUS[checker.__name__] == "not attempted"


def test_modules_do_not_import_tensorflow():
    code = ("import sys, labkit.check.pipeline, labkit.check.search; "
            "print('tensorflow' in sys.modules, 'tf_keras' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(ROOT))
    assert done.stdout.split() == ["False", "False"], done.stderr[-2000:]


# ----------------------------------------------------------------------------- dominates

def dominates_numpy(a, b):
    """Correct, written differently: signs turn every objective into 'smaller
    is better'; returns np.bool_."""
    x, y = np.array(a, float) * [-1, 1, 1], np.array(b, float) * [-1, 1, 1]
    return np.all(x <= y) & np.any(x < y)


def dominates_loops(a, b):
    """Correct, with unpacking and early returns; answers 1 or 0."""
    acc_a, lat_a, size_a = a
    acc_b, lat_b, size_b = b
    if acc_a < acc_b or lat_a > lat_b or size_a > size_b:
        return 0
    return int((acc_a, lat_a, size_a) != (acc_b, lat_b, size_b))


def dominates_labkit(a, b):
    table = pd.DataFrame([a, b], columns=[c for c, _ in results.OBJECTIVES])
    return not results.pareto_front(table).iloc[1]


@pytest.mark.parametrize("fn", [solutions.dominates, dominates_numpy, dominates_loops,
                                dominates_labkit])
def test_dominates_accepts_correct_answers(fn, capsys):
    passes(pipeline_checks.dominates, fn, capsys)


def test_dominates_hand_answers_agree_with_labkit():
    for a, b, by_hand in pipeline_checks.DOMINATES_BY_HAND:
        assert dominates_labkit(a, b) == by_hand, (a, b)


def sign_flip(which):
    def wrong(a, b):
        x, y = np.array(a, float) * [-1, 1, 1], np.array(b, float) * [-1, 1, 1]
        x[which], y[which] = -x[which], -y[which]
        return bool(np.all(x <= y) and np.any(x < y))
    return wrong


DOMINATES_WRONG = {
    "equal points dominate": (lambda a, b: a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2],
                              "two equal points"),
    "strict everywhere": (lambda a, b: a[0] > b[0] and a[1] < b[1] and a[2] < b[2],
                          "strictly better on every"),
    "any better": (lambda a, b: a[0] > b[0] or a[1] < b[1] or a[2] < b[2],
                   "without checking that it is no worse"),
    "maximised latency": (sign_flip([1]), "higher latency as better"),
    "maximised size": (sign_flip([2]), "larger size as better"),
    "maximised both": (sign_flip([1, 2]), "maximised latency and size"),
    "minimised accuracy": (sign_flip([0]), "lower accuracy as better"),
    "swapped": (lambda a, b: solutions.dominates(b, a), "arguments are swapped"),
    "inverted": (lambda a, b: not solutions.dominates(a, b), "inverted"),
    "ignored size": (lambda a, b: solutions.dominates((*a[:2], 0), (*b[:2], 0)), "ignored size"),
    "ignored accuracy": (lambda a, b: solutions.dominates((0, *a[1:]), (0, *b[1:])),
                         "ignored accuracy"),
    "per-objective answers": (lambda a, b: [a[0] >= b[0], a[1] <= b[1], a[2] <= b[2]],
                              "one True or False"),
    "forgot return": (lambda a, b: None, "forget the `return`"),
    "a string": (lambda a, b: "yes", "return True or False"),
    "better on two, worse on none": (  # a stricter rule than Pareto dominance
        lambda a, b: solutions.dominates(a, b)
        and sum(np.array(a) * [-1, 1, 1] < np.array(b) * [-1, 1, 1]) >= 2,
        "a dominates b when"),
}


@pytest.mark.parametrize("mistake", DOMINATES_WRONG)
def test_dominates_diagnoses_typical_mistakes(mistake):
    fn, words = DOMINATES_WRONG[mistake]
    with pytest.raises(ExerciseError, match=words):
        pipeline_checks.dominates(fn)


# ----------------------------------------------------------------------------- pareto_front

def front_numpy(points):
    """Correct, written differently: all pairs at once; a list of 0/1 ints."""
    v = np.array(points, float) * [-1, 1, 1]
    # [i, j]: i dominates j
    beats = (v[:, None] <= v[None]).all(axis=2) & (v[:, None] < v[None]).any(axis=2)
    return [int(not column.any()) for column in beats.T]


def front_sorted_sweep(points):
    """Correct, another way: only a point earlier in (accuracy desc, latency, size)
    order can dominate a later one."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], points[i][1], points[i][2]))
    keep = [True] * len(points)
    for k, i in enumerate(order):
        keep[i] = not any(solutions.dominates(points[j], points[i]) for j in order[:k])
    return keep


def front_labkit(points):
    return results.pareto_front(pd.DataFrame(points,
                                             columns=[c for c, _ in results.OBJECTIVES])).to_numpy()


@pytest.mark.parametrize("fn", [solutions.pareto_front, front_numpy, front_sorted_sweep,
                                front_labkit])
def test_pareto_front_accepts_correct_answers(fn, capsys):
    passes(pipeline_checks.pareto_front, fn, capsys)


def test_pareto_front_hand_answers_agree_with_labkit():
    for points, by_hand in pipeline_checks.PARETO_BY_HAND:
        assert front_labkit(points).tolist() == by_hand, points


SIGNS = np.array([-1, 1, 1])   # accuracy is better higher: flip it so that smaller is better


def weak_front(points, skip_self):
    def weak(a, b):
        return a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2]
    return [not any(weak(q, p) for j, q in enumerate(points) if not (skip_self and i == j))
            for i, p in enumerate(points)]


def unique_first(points):
    front, seen = list(solutions.pareto_front(points)), set()
    for i, p in enumerate(points):
        front[i] = front[i] and tuple(p) not in seen
        seen.add(tuple(p))
    return front


PARETO_WRONG = {
    "inverted": (lambda pts: ~solutions.pareto_front(pts), "inverted"),
    "a point dominates itself": (lambda pts: weak_front(pts, skip_self=False), "no point is kept"),
    "equal points knock each other out": (lambda pts: weak_front(pts, skip_self=True),
                                          "equal points knock"),
    "unique first": (unique_first, "kept only the first"),
    "strict dominance": (lambda pts: [not any(all(np.array(q) * SIGNS < np.array(p) * SIGNS)
                                              for q in pts)
                                      for p in pts], "too many points kept"),
    "maximised latency": (lambda pts: solutions.pareto_front([(a, -l, s) for a, l, s in pts]),
                          "higher latency"),
    "ignored size": (lambda pts: solutions.pareto_front([(a, l, 0) for a, l, s in pts]),
                     "ignored size"),
    "sorted order": (lambda pts: front_labkit(sorted(pts, key=lambda p: p[2])),
                     "sorted by size_bytes"),
    "indices": (lambda pts: np.flatnonzero(solutions.pareto_front(pts)), "indices"),
    "the points": (lambda pts: np.array(pts)[solutions.pareto_front(pts)].reshape(-1, 3),
                   "the points on the front"),
    "one bool": (lambda pts: True, "one boolean per point"),
    "forgot return": (lambda pts: None, "forget the `return`"),
    "off by one point": (lambda pts: list(solutions.pareto_front(pts))[:-1] or [False, False],
                         "wrong shape"),
}


@pytest.mark.parametrize("mistake", PARETO_WRONG)
def test_pareto_front_diagnoses_typical_mistakes(mistake):
    fn, words = PARETO_WRONG[mistake]
    with pytest.raises(ExerciseError, match=words):
        pipeline_checks.pareto_front(fn)


def test_pareto_front_generic_message_names_a_dominating_point():
    def lost_one(points):  # the right front, except that a dominated point sneaks in among 4 points
        front = list(solutions.pareto_front(points))
        if len(points) == 4 and not all(front):
            front[front.index(False)] = True
        return front
    with pytest.raises(ExerciseError, match=r"point \d .* is dominated by point \d"):
        pipeline_checks.pareto_front(lost_one)


# ----------------------------------------------------------------------------- low_rank

def low_rank_transposed(weights, rank):
    """Correct, written differently: the SVD of W^T, S on the b side, float32 lists."""
    u, s, vt = np.linalg.svd(np.asarray(weights, np.float64).T, full_matrices=False)   # W = V S U^T
    a = vt[:rank].T
    b = s[:rank, None] * u[:, :rank].T
    return a.astype(np.float32).tolist(), b.astype(np.float32).tolist()


def low_rank_labkit(weights, rank):
    from labkit import lowrank
    return lowrank.svd_factors(weights, rank)


@pytest.mark.parametrize("fn", [solutions.low_rank, low_rank_transposed, low_rank_labkit])
def test_low_rank_accepts_correct_answers(fn, capsys):
    passes(search_checks.low_rank, fn, capsys)


def svd(weights):
    return np.linalg.svd(np.asarray(weights, np.float64), full_matrices=False)


def _smallest(w, r):
    u, s, vt = svd(w)
    return u[:, -r:] * s[-r:], vt[-r:]


def _forgot_s(w, r):
    u, s, vt = svd(w)
    return u[:, :r], vt[:r]


def _s_twice(w, r):
    u, s, vt = svd(w)
    return u[:, :r] * s[:r], s[:r, None] * vt[:r]


def _half_root(w, r):
    u, s, vt = svd(w)
    return u[:, :r] * np.sqrt(s[:r]), vt[:r]


def _b_not_transposed(w, r):
    u, s, vt = svd(w)
    return u[:, :r] * s[:r], vt[:r].T


def _no_truncation(w, r):
    u, s, vt = svd(w)
    return u * s, vt


def _rank_plus_one(w, r):
    u, s, vt = svd(w)
    return u[:, :r + 1] * s[:r + 1], vt[:r + 1]


def _product(w, r):
    a, b = solutions.low_rank(w, r)
    return a @ b


def _three(w, r):
    u, s, vt = svd(w)
    return u[:, :r], s[:r], vt[:r]


def _random_factors(w, r):
    rng = np.random.default_rng(0)
    return rng.normal(size=(w.shape[0], r)), rng.normal(size=(r, w.shape[1]))


LOW_RANK_WRONG = {
    "smallest singular values": (_smallest, "SMALLEST singular values"),
    "forgot S": (_forgot_s, "forgot the singular values S"),
    "S twice": (_s_twice, "S is counted twice"),
    "half the square root": (_half_root, r"only sqrt\(S\)"),
    "b not transposed": (_b_not_transposed, "transpose it"),
    "no truncation": (_no_truncation, "no truncation"),
    "rank + 1": (_rank_plus_one, r"rank off by \+1"),
    "the product": (_product, "return the pair"),
    "U, S, V^T": (_three, "fold S into a or b"),
    "random factors": (_random_factors, "not the best rank-1 approximation"),
    "forgot return": (lambda w, r: None, "forget the `return`"),
}


@pytest.mark.parametrize("mistake", LOW_RANK_WRONG)
def test_low_rank_diagnoses_typical_mistakes(mistake):
    fn, words = LOW_RANK_WRONG[mistake]
    with pytest.raises(ExerciseError, match=words):
        search_checks.low_rank(fn)


# ----------------------------------------------------------------------------- distillation_loss

def distillation_loops(student_logits, teacher_logits, labels, temperature, alpha):
    """Correct, written differently: image by image with math, float32 inputs kept as they come."""
    import math
    total_ce = total_kl = 0.0
    for s, t, y in zip(student_logits, teacher_logits, labels):
        def probabilities(z, temp):
            top = max(z)
            e = [math.exp((v - top) / temp) for v in z]
            return [v / sum(e) for v in e]
        total_ce += -math.log(probabilities(s, 1.0)[y])
        p, q = probabilities(t, temperature), probabilities(s, temperature)
        total_kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)
    n = len(labels)
    return alpha * total_ce / n + (1 - alpha) * temperature ** 2 * total_kl / n


def distillation_keras(student_logits, teacher_logits, labels, temperature, alpha):
    """Correct, as Keras's distillation example computes it: its own losses, batch-averaged."""
    import tensorflow as tf
    import tf_keras as keras
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, student_logits)
    kl = keras.losses.KLDivergence()(tf.nn.softmax(teacher_logits / temperature),
                                     tf.nn.softmax(student_logits / temperature))
    return float(alpha * ce + (1 - alpha) * temperature ** 2 * kl)


def distillation_labkit(student_logits, teacher_logits, labels, temperature, alpha):
    from labkit import distill
    loss = distill.distillation_loss(labels, teacher_logits, student_logits, temperature, alpha)
    return loss.numpy().mean()


@pytest.mark.parametrize("fn", [solutions.distillation_loss, distillation_loops, distillation_keras,
                                distillation_labkit])
def test_distillation_loss_accepts_correct_answers(fn, capsys):
    passes(search_checks.distillation_loss, fn, capsys)


def test_numpy_definition_matches_labkit():
    rng = np.random.default_rng(3)
    s, t, y = rng.normal(size=(6, 10)), 3 * rng.normal(size=(6, 10)), rng.integers(0, 10, 6)
    for temperature, alpha in [(1.0, 0.0), (4.0, 0.1), (2.0, 1.0), (8.0, 0.5)]:
        assert search_checks.numpy_distillation_loss(s, t, y, temperature, alpha) == \
            pytest.approx(distillation_labkit(s, t, y, temperature, alpha), rel=1e-5, abs=1e-6)


def loss_variant(*, t2=True, swap=False, soft_labels=False, reverse=False, reduce=np.mean,
                 soft_ce=False, teacher_hot=False, kl_over_classes=False, per_image=False):
    """The solution's loss with one typical mistake switched on."""
    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    def loss(student_logits, teacher_logits, labels, temperature, alpha):
        s, t = np.asarray(student_logits, float), np.asarray(teacher_logits, float)
        rows = np.arange(len(labels))
        hard = -log_softmax(s / temperature if soft_labels else s)[rows, labels]
        log_p = log_softmax(t if teacher_hot else t / temperature)
        log_q = log_softmax(s / temperature)
        if reverse:
            log_p, log_q = log_q, log_p
        kl = np.sum(np.exp(log_p) * ((0 if soft_ce else log_p) - log_q), axis=1)
        if kl_over_classes:
            kl = kl / s.shape[1]
        a = 1 - alpha if swap else alpha
        per = a * hard + (1 - a) * (temperature ** 2 if t2 else 1) * kl
        scale = temperature ** 2 if t2 else 1
        return per if per_image else float(reduce(a * hard) + reduce((1 - a) * scale * kl))
    return loss


DISTILLATION_WRONG = {
    "forgot T^2": (loss_variant(t2=False), "forgot the T\\^2"),
    "alpha on the wrong term": (loss_variant(swap=True), "alpha is on the wrong term"),
    "softened the label term": (loss_variant(soft_labels=True), "softened the label term"),
    "KL reversed": (loss_variant(reverse=True), "KL is reversed"),
    "sum not mean": (loss_variant(reduce=np.sum), "summed over the batch"),
    "soft cross-entropy": (loss_variant(soft_ce=True),
                           "cross-entropy with the teacher's soft targets"),
    "teacher not softened": (loss_variant(teacher_hot=True), "soften the teacher's too"),
    "KL averaged over classes": (loss_variant(kl_over_classes=True),
                                 "averaged the KL over the classes"),
    "per image": (loss_variant(per_image=True), "one loss per image"),
    "forgot return": (lambda *args: None, "forget the `return`"),
    "nonsense": (lambda s, t, y, temperature, alpha: 0.123, "Expected .* got 0.123"),
    "labkit's old convention (alpha on the teacher)": (
        lambda s, t, y, temperature, alpha: distillation_labkit(s, t, y, temperature, 1 - alpha),
        "alpha is on the wrong term"),
}


@pytest.mark.parametrize("mistake", DISTILLATION_WRONG)
def test_distillation_loss_diagnoses_typical_mistakes(mistake):
    fn, words = DISTILLATION_WRONG[mistake]
    with pytest.raises(ExerciseError, match=words):
        search_checks.distillation_loss(fn)


def test_a_crash_names_the_inputs():
    with pytest.raises(ExerciseError, match="raised IndexError.*\n  on \\("):
        search_checks.distillation_loss(lambda s, t, y, temperature, alpha: s[100, 100])
