"""Checkers for the pipeline's exercises: when one variant dominates another, and the Pareto front.

A variant is a point (accuracy, latency_us, size_bytes): accuracy higher is better, latency and size
lower. The reference is `results.pareto_front`, the function the pipeline chapter
calls on the results store (for `dominates`, on a table of the two points). NumPy and
pandas only: no TensorFlow here.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from labkit import results
from labkit.check import exercise, fail

OBJECTIVES = ("accuracy", "latency_us", "size_bytes")
COLUMNS = [column for column, _ in results.OBJECTIVES]   # accuracy, latency_p50_us, gzip_bytes
SIGNS = np.array([-1.0, 1.0, 1.0])   # turns every objective into "smaller is better"


# ----------------------------------------------------------------------------- shared helpers

def _reference_front(points) -> np.ndarray:
    """results.pareto_front on a results-store-like table of the points."""
    table = pd.DataFrame([tuple(float(v) for v in p) for p in points], columns=COLUMNS)
    return results.pareto_front(table).to_numpy(dtype=bool)


def _reference_dominates(a, b) -> bool:
    """a dominates b exactly when b is off the front of the two points {a, b}."""
    return not bool(_reference_front([a, b])[1])


def _compare(a, b) -> str:
    """How a fares against b, objective by objective, in words."""
    words = []
    for name, sign, x, y in zip(OBJECTIVES, SIGNS, a, b):
        x, y = sign * float(x), sign * float(y)
        words.append(f"{'better' if x < y else 'worse' if x > y else 'equal'} on {name}")
    return "a is " + ", ".join(words)


def _rule(a, b, signs=SIGNS, rule="correct", use=(0, 1, 2)) -> bool:
    """A dominance test, right (rule "correct") or with a typical mistake."""
    x = np.array([float(v) for v in a])[list(use)] * signs[list(use)]
    y = np.array([float(v) for v in b])[list(use)] * signs[list(use)]
    no_worse, better = bool(np.all(x <= y)), bool(np.any(x < y))
    return {"correct": no_worse and better, "weak": no_worse, "strict": bool(np.all(x < y)),
            "any": better}[rule]


def _flip(*which: int) -> np.ndarray:
    signs = SIGNS.copy()
    signs[list(which)] *= -1
    return signs


# The typical wrong dominance tests: (diagnosis, dominates(a, b) as that mistake computes it).
DOMINANCE_MISTAKES = [
    ("two equal points dominate each other in your version: 'at least as good everywhere' is not "
     "enough, a must also be strictly better on at least one objective",
     lambda a, b: _rule(a, b, rule="weak")),
    ("you asked for strictly better on every objective; dominating needs only 'at least as "
     "good everywhere and strictly better on one' (a point that ties on size but is faster and "
     "more accurate dominates)",
     lambda a, b: _rule(a, b, rule="strict")),
    ("you return True when a is better on some objective, without checking that it "
     "is no worse on the others",
     lambda a, b: _rule(a, b, rule="any")),
    ("you treated higher latency as better: latency_us, like size_bytes, is better when lower",
     lambda a, b: _rule(a, b, signs=_flip(1))),
    ("you treated a larger size as better: size_bytes, like latency_us, is better when lower",
     lambda a, b: _rule(a, b, signs=_flip(2))),
    ("you maximised latency and size: both are better when lower, only "
     "accuracy is better when higher",
     lambda a, b: _rule(a, b, signs=_flip(1, 2))),
    ("you treated lower accuracy as better: accuracy is the one objective where higher is better",
     lambda a, b: _rule(a, b, signs=_flip(0))),
    ("the arguments are swapped: you answer 'does b dominate a?'; dominates(a, b) asks whether a "
     "dominates b (or every sense is reversed: higher latency and size, lower accuracy counted as "
     "better, which is the same)",
     lambda a, b: _rule(b, a)),
    ("the answer is inverted: you return True exactly when a does NOT dominate b",
     lambda a, b: not _rule(a, b)),
    ("you ignored accuracy (the first entry): all three objectives count",
     lambda a, b: _rule(a, b, use=(1, 2))),
    ("you ignored latency (the second entry): all three objectives count",
     lambda a, b: _rule(a, b, use=(0, 2))),
    ("you ignored size (the third entry): all three objectives count",
     lambda a, b: _rule(a, b, use=(0, 1))),
]


def _as_bool(name: str, value, args) -> bool:
    """The learner's answer as a bool, or an ExerciseError that says what came back instead."""
    if value is None:
        fail(name, "your function returned None: did you forget the `return`?", args)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    array = np.asarray(value) if isinstance(value, (np.ndarray, list, tuple)) else None
    if array is not None and array.size > 1:
        fail(name, f"return one True or False, not {array.size} values ({value!r:.80}): "
                   "combine the per-objective comparisons with all(...) and any(...)", args)
    if array is not None and array.size == 1 and array.dtype.kind in "biu" \
            and array.item() in (0, 1):
        return bool(array.item())
    fail(name, f"return True or False, got {type(value).__name__}: {value!r:.80}", args)


def _grid_point(rng) -> tuple:
    """A point on a coarse grid, so that ties on one or more objectives are frequent."""
    return (float(rng.choice([0.97, 0.98, 0.99])), float(rng.choice([100.0, 200.0, 300.0])),
            int(rng.choice([1000, 2000, 3000])))


# ----------------------------------------------------------------------------- dominates

DOMINATES_BY_HAND = [
    # (a, b, a dominates b?) - every line can be settled by reading the three numbers
    ((0.99, 100.0, 1000), (0.98, 200.0, 2000), True),    # better on all three
    ((0.98, 200.0, 2000), (0.99, 100.0, 1000), False),   # worse on all three
    ((0.99, 100.0, 1000), (0.99, 100.0, 1000), False),   # equal points: neither dominates
    ((0.99, 100.0, 1000), (0.99, 150.0, 1000), True),    # ties on two, faster
    ((0.99, 100.0, 1000), (0.98, 100.0, 1000), True),    # ties on two, more accurate
    ((0.99, 100.0, 1000), (0.99, 100.0, 1500), True),    # ties on two, smaller
    ((0.99, 200.0, 1000), (0.98, 100.0, 1000), False),   # more accurate but slower: a trade-off
    ((0.98, 100.0, 500), (0.99, 100.0, 1000), False),    # smaller but less accurate
    ((0.99, 200.0, 1000), (0.99, 100.0, 1000), False),   # slower, the rest equal
    ((0.99, 100.0, 2000), (0.99, 100.0, 1000), False),   # larger, the rest equal
]


@exercise("dominates", "07", "results.pareto_front",
          "dominates(a, b) -> bool, a and b are (accuracy, latency_us, size_bytes)")
def dominates(call):
    """10 pairs by hand (ties, trade-offs, equal points), then 150 random pairs on a coarse grid
    (many ties) against results.pareto_front on the two points."""
    name = "dominates"
    rng = np.random.default_rng(7)
    cases = [(a, b) for a, b, _ in DOMINATES_BY_HAND]
    for _ in range(150):
        a = _grid_point(rng)
        b = a if rng.random() < 0.1 else _grid_point(rng)
        cases.append((a, b) if rng.random() < 0.5 else (list(a), list(b)))   # tuples or lists
    expected = [_reference_dominates(a, b) for a, b in cases]
    got = [_as_bool(name, call(tuple(a) if isinstance(a, tuple) else list(a),
                               tuple(b) if isinstance(b, tuple) else list(b)),
                    (a, b)) for a, b in cases]
    if got == expected:
        return (f"{len(DOMINATES_BY_HAND)} pairs by hand, "
                f"{len(cases) - len(DOMINATES_BY_HAND)} random ones against results.pareto_front")
    first = next(i for i, (g, e) in enumerate(zip(got, expected)) if g != e)
    a, b = cases[first]
    where = f"dominates(a, b) returned {got[first]}, expected {expected[first]} ({_compare(a, b)})"
    for message, wrong in DOMINANCE_MISTAKES:
        if [wrong(x, y) for x, y in cases] == got:
            fail(name, f"{message}. For example {where}", (a, b))
    fail(name, f"{where}. a dominates b when a is at least as good on all three "
               "objectives (accuracy higher, latency and size lower or equal) and "
               "strictly better on at least one", (a, b))


# ----------------------------------------------------------------------------- pareto_front

def _front(points, rule="correct", signs=SIGNS, use=(0, 1, 2), skip_self=True) -> np.ndarray:
    """A Pareto front, right or with a typical mistake in its dominance test or its loop."""
    return np.array([not any(_rule(q, p, signs, rule, use) for j, q in enumerate(points)
                             if not (skip_self and j == i))
                     for i, p in enumerate(points)], dtype=bool)


def _dedup_front(points) -> np.ndarray:
    """The front with only the first of equal points kept (the typical 'unique first' mistake)."""
    front = _front(points)
    seen = set()
    for i, p in enumerate(points):
        key = tuple(float(v) for v in p)
        if key in seen:
            front[i] = False
        seen.add(key)
    return front


def _sorted_front(points, column: int, descending: bool) -> np.ndarray:
    """The right front, but listed in the order of the points sorted by one objective."""
    keys = np.array([float(p[column]) for p in points]) * (-1 if descending else 1)
    order = np.argsort(keys, kind="stable")
    return _front(points)[order]


PARETO_MISTAKES = [
    ("the mask is inverted: True must mark the points ON the front (dominated by no other point), "
     "False the dominated ones",
     lambda pts: ~_front(pts)),
    ("no point is kept: under your test every point dominates itself (at least as good as itself "
     "everywhere). Require strictly better on one objective, or skip the point itself",
     lambda pts: _front(pts, rule="weak", skip_self=False)),
    ("equal points knock each other out: two identical points are both on the front, since neither "
     "is strictly better than the other (your dominance test lacks 'strictly better somewhere')",
     lambda pts: _front(pts, rule="weak")),
    ("of two equal points you kept only the first; both belong on the front "
     "(neither dominates the other)",
     _dedup_front),
    ("too many points kept: your dominance asks for strictly better on every objective, so a point "
     "beaten on two objectives and tied on the third survives",
     lambda pts: _front(pts, rule="strict")),
    ("too few points kept: a point counts as dominated as soon as another is better on one "
     "objective; it must also be at least as good on all the others",
     lambda pts: _front(pts, rule="any")),
    ("you treated higher latency as better: latency_us is better when lower",
     lambda pts: _front(pts, signs=_flip(1))),
    ("you treated a larger size as better: size_bytes is better when lower",
     lambda pts: _front(pts, signs=_flip(2))),
    ("you maximised latency and size: both are better when lower, only accuracy when higher",
     lambda pts: _front(pts, signs=_flip(1, 2))),
    ("you treated lower accuracy as better: accuracy is better when higher",
     lambda pts: _front(pts, signs=_flip(0))),
    ("you ignored accuracy (the first entry of each point): all three objectives count",
     lambda pts: _front(pts, use=(1, 2))),
    ("you ignored latency (the second entry of each point): all three objectives count",
     lambda pts: _front(pts, use=(0, 2))),
    ("you ignored size (the third entry of each point): all three objectives count",
     lambda pts: _front(pts, use=(0, 1))),
] + [(f"the booleans follow the points sorted by {OBJECTIVES[c]}; return them in the "
      "order the points came in",
      lambda pts, c=c, d=d: _sorted_front(pts, c, d)) for c in range(3) for d in (False, True)]


def _as_mask(name: str, value, points, args) -> np.ndarray:
    """The learner's answer as N booleans, or an ExerciseError that says what came back instead."""
    n = len(points)
    if value is None:
        fail(name, "your function returned None: did you forget the `return`?", args)
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        fail(name, "return N booleans (a list or an array), got "
                   f"{type(value).__name__}: {value!r:.80}", args)
    if array.ndim == 2 and array.shape[1:] == (3,):
        fail(name, f"you returned the points on the front ({array.shape[0]} of them); return one "
                   f"boolean per point instead, {n} in all, True for the points on the front", args)
    if array.ndim == 0:
        fail(name, f"return one boolean per point ({n} in all), not a single "
                   f"{type(value).__name__}", args)
    if array.ndim == 1 and array.dtype.kind in "iu" and array.size != n \
            and set(array.tolist()) <= set(range(n)):
        fail(name, f"this looks like the indices of the front's points ({array.tolist()}); return "
                   f"one boolean per point instead, {n} in all, True at those indices", args)
    if array.shape != (n,):
        fail(name, f"wrong shape: expected one boolean per point, shape ({n},), "
                   f"got shape {array.shape}", args)
    if array.dtype == bool:
        return array
    if array.dtype.kind in "iuf" and np.isin(array, (0, 1)).all():
        return array.astype(bool)
    if array.dtype.kind in "iu" and set(array.tolist()) <= set(range(n)):
        fail(name, f"this looks like indices of the front's points ({array.tolist()}); return "
                   "booleans, True for the points on the front", args)
    fail(name, f"return booleans (True/False, or 1/0), got values {array.tolist()!r:.80}", args)


def _show_points(points) -> str:
    return "[" + ", ".join(f"({p[0]:g}, {p[1]:g}, {p[2]:g})" for p in points) + "]"


PARETO_BY_HAND = [
    # (points, front) - small enough to settle on paper
    ([(0.99, 100.0, 1000)], [True]),   # one point: on its front
    ([(0.99, 100.0, 1000), (0.98, 200.0, 2000)], [True, False]),   # the second is beaten everywhere
    ([(0.99, 200.0, 1000), (0.98, 100.0, 1000)], [True, True]),   # a trade-off: both kept
    # ties kept
    ([(0.99, 100.0, 1000), (0.99, 100.0, 1000), (0.98, 100.0, 1000)], [True, True, False]),
    ([(0.98, 300.0, 3000), (0.99, 100.0, 3000), (0.99, 100.0, 2000), (0.97, 50.0, 4000)],
     # the middle pair: the smaller one wins; the fast one is a trade-off
     [False, False, True, True]),
    ([(0.97, 300.0, 500), (0.98, 200.0, 800), (0.99, 100.0, 900), (0.975, 250.0, 850)],
     [True, True, True, False]),      # a staircase; the last is beaten by the second on all three
]


@exercise("pareto_front", "07", "results.pareto_front",
          "pareto_front(points) -> N booleans, True for points no other point dominates")
def pareto_front(call):
    """6 small sets by hand (a lone point, ties, trade-offs, a staircase), then 60 random sets of up
    to 12 points (ties and repeated points included) against results.pareto_front."""
    name = "pareto_front"
    rng = np.random.default_rng(11)
    cases = [points for points, _ in PARETO_BY_HAND]
    for k in range(60):
        n = int(rng.integers(2, 13))
        if k % 3 == 2:   # continuous values: ties are rare, fronts are long
            points = [(float(rng.uniform(0.95, 0.995)), float(rng.uniform(50, 500)),
                       int(rng.integers(500, 5000)))
                      for _ in range(n)]
        else:
            points = [_grid_point(rng) for _ in range(n)]
        # repeat a point: equal points are both on the front or both off
        if n > 2 and rng.random() < 0.4:
            points[int(rng.integers(n))] = points[int(rng.integers(n))]
        cases.append(points)
    expected = [_reference_front(points) for points in cases]
    got = [_as_mask(name, call(list(points)), points, (_show_points(points),)) for points in cases]
    if all(np.array_equal(g, e) for g, e in zip(got, expected)):
        return (f"{len(PARETO_BY_HAND)} sets by hand, {len(cases) - len(PARETO_BY_HAND)} random "
                "ones against results.pareto_front")
    first = next(i for i, (g, e) in enumerate(zip(got, expected)) if not np.array_equal(g, e))
    points = cases[first]
    where = (f"for points {_show_points(points)} you returned {got[first].tolist()}, "
             f"expected {expected[first].tolist()}")
    for message, wrong in PARETO_MISTAKES:
        if all(np.array_equal(wrong(p), g) for p, g in zip(cases, got)):
            fail(name, f"{message}. For example {where}")
    wrong_at = [i for i in range(len(points)) if got[first][i] != expected[first][i]]
    i = wrong_at[0]
    if expected[first][i]:
        why = (f"no other point dominates point {i} {_show_points([points[i]])[1:-1]}, so it is "
               "on the front")
    else:
        j = next(j for j, q in enumerate(points) if _rule(q, points[i]))
        why = (f"point {i} {_show_points([points[i]])[1:-1]} is dominated by point {j} "
               f"{_show_points([points[j]])[1:-1]}, so it is off the front")
    fail(name, f"{where}: {why}. A point is on the front when no other point is at least as good "
               "on all three objectives and strictly better on one")
