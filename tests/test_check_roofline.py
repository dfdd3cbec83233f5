"""The checkers of the performance model (labkit/check/roofline.py): arithmetic intensity, the
roofline's time, and the replicas a tail-latency SLO needs.

Each checker must pass the solution, a second correct implementation written differently, and
labkit's own function; report a blank as "not attempted"; and reject each typical mistake with
its diagnosis.
"""
import math

import numpy as np
import pytest

import labkit.check.roofline as roofline_checks
import labkit.check.solutions as solutions
from labkit import check, queueing, roofline

ExerciseError = check.ExerciseError


def passes(checker, fn, capsys):
    checker(fn)
    out = capsys.readouterr().out
    assert out.startswith("✓"), out
    return out


def test_the_three_checkers_are_registered_with_their_notebooks():
    for name, notebook in [("arithmetic_intensity", "01"), ("roofline_time", "01"),
                           ("replicas_needed", "09")]:
        assert check.EXERCISES[name].notebook == notebook
        assert getattr(check, name) is getattr(roofline_checks, name)
        assert hasattr(solutions, name)


@pytest.mark.parametrize("name", ["arithmetic_intensity", "roofline_time", "replicas_needed"])
def test_blanks_are_not_attempted(name, capsys):
    def blank(*args, **kwargs):
        raise NotImplementedError

    def dots(*args, **kwargs):
        return ...
    for fn in (blank, dots):
        getattr(roofline_checks, name)(fn)
        assert f"○ {name}: not attempted" in capsys.readouterr().out


# ----------------------------------------------------------------------------- arithmetic_intensity

def intensity_in_steps(macs, weight_count, weight_bits, activation_count, activation_bits=32):
    """Bytes counted separately, a NumPy float back."""
    weight_bytes = np.float64(weight_count) * weight_bits / 8
    activation_bytes = np.float64(activation_count) * activation_bits / 8
    if weight_bytes + activation_bytes == 0:
        raise ValueError("no bytes moved")
    return np.float64(2 * macs) / (weight_bytes + activation_bytes)


def intensity_float32(*args, **kwargs):
    return np.float32(solutions.arithmetic_intensity(*args, **kwargs))


@pytest.mark.parametrize("fn", [solutions.arithmetic_intensity, intensity_in_steps,
                                roofline.arithmetic_intensity, intensity_float32],
                         ids=["solution", "numpy-steps", "labkit", "float32"])
def test_arithmetic_intensity_accepts_correct_answers(fn, capsys):
    passes(roofline_checks.arithmetic_intensity, fn, capsys)


def _intensity(flops_per_mac=2, per_byte=8, wbits=None, abits=None, weights=True,
               activations=True, inverse=False, floor=False):
    """An intensity with the typical mistakes switched on by name."""
    def fn(macs, weight_count, weight_bits, activation_count, activation_bits=32):
        moved = (weights * weight_count * (wbits or weight_bits)
                 + activations * activation_count * (abits or activation_bits)) / per_byte
        if moved == 0:
            raise ValueError("nothing moved")
        flops = flops_per_mac * macs
        if inverse:
            return moved / flops
        return math.floor(flops / moved) * 1.0 if floor else flops / moved
    return fn


INTENSITY_MISTAKES = {
    "bits as bytes": (_intensity(per_byte=1), "bits as bytes"),
    "activations forgotten": (_intensity(activations=False), "forgot the activations"),
    "weights forgotten": (_intensity(weights=False), "forgot the weights"),
    "MACs as FLOPs": (_intensity(flops_per_mac=1), "MACs as FLOPs"),
    "activation bits ignored": (_intensity(abits=32), "ignored activation_bits"),
    "weight bits ignored": (_intensity(wbits=32), "ignored weight_bits"),
    "inverse": (_intensity(inverse=True), "inverse, bytes per FLOP"),
    "bytes per MAC": (_intensity(flops_per_mac=1, inverse=True), "bytes per MAC"),
    "float floor": (_intensity(floor=True), r"// \(floor division\)"),
    "int floor": (lambda m, wc, wb, ac, activation_bits=32:
                  2 * m // ((wc * wb + ac * activation_bits) // 8),
                  r"// \(floor division\): return a float"),
    "wrong default": (lambda m, wc, wb, ac, activation_bits=8:
                      solutions.arithmetic_intensity(m, wc, wb, ac, activation_bits),
                      "default activation_bits=32"),
    "a string": (lambda *a, **k: str(solutions.arithmetic_intensity(*a, **k)), "one finite number"),
    "off by a constant": (lambda *a, **k: solutions.arithmetic_intensity(*a, **k) + 0.5,
                          r"expected 300 FLOPs / 100 bytes = 3, got 3.5"),
    "division by zero": (lambda m, wc, wb, ac, activation_bits=32:
                         2 * m / ((wc * wb + ac * activation_bits) / 8),
                         "nothing is moved.*not ZeroDivisionError"),
    "inf when nothing moved": (lambda *a, **k: (solutions.arithmetic_intensity(*a, **k)
                                                if a[1] or a[3] else math.inf),
                               "nothing is moved.*you returned inf"),
}


@pytest.mark.parametrize("mistake", list(INTENSITY_MISTAKES))
def test_arithmetic_intensity_diagnoses_typical_mistakes(mistake):
    fn, message = INTENSITY_MISTAKES[mistake]
    with pytest.raises(ExerciseError, match=message):
        roofline_checks.arithmetic_intensity(fn)


def test_arithmetic_intensity_names_the_inputs_of_the_failing_case():
    def wrong_on_big_layers(m, wc, wb, ac, activation_bits=32):
        extra = 0.1 if wc > 1000 else 0
        return solutions.arithmetic_intensity(m, wc, wb, ac, activation_bits) + extra
    with pytest.raises(ExerciseError, match=r"\n  on \(401408, 401408, 32, 3264, 32\)"):
        roofline_checks.arithmetic_intensity(wrong_on_big_layers)


# ----------------------------------------------------------------------------- roofline_time

def time_by_intensity(macs, bytes_moved, peak_flops_per_s, bandwidth_bytes_per_s):
    """The roofline read the other way: attainable FLOP/s = min(peak, intensity x bandwidth)."""
    if macs == 0:
        return bytes_moved / bandwidth_bytes_per_s
    intensity = 2 * macs / bytes_moved
    return 2 * macs / min(peak_flops_per_s, intensity * bandwidth_bytes_per_s)


def time_with_numpy(macs, bytes_moved, peak_flops_per_s, bandwidth_bytes_per_s):
    return np.maximum(np.float64(2 * macs) / peak_flops_per_s,
                      np.float64(bytes_moved) / bandwidth_bytes_per_s)


@pytest.mark.parametrize("fn", [solutions.roofline_time, time_by_intensity, time_with_numpy,
                                roofline.roofline_time],
                         ids=["solution", "intensity", "numpy", "labkit"])
def test_roofline_time_accepts_correct_answers(fn, capsys):
    passes(roofline_checks.roofline_time, fn, capsys)


def _time(m, b, p, w):
    return solutions.roofline_time(m, b, p, w)


TIME_MISTAKES = {
    "sum": (lambda m, b, p, w: 2 * m / p + b / w,
            "no-overlap model; the roofline assumes compute and memory traffic overlap, so the "
            "slower one bounds the time"),
    "min": (lambda m, b, p, w: min(2 * m / p, b / w), "smaller of the two times, here the compute"),
    "memory only": (lambda m, b, p, w: b / w, "smaller of the two times, here the memory"),
    "compute only": (lambda m, b, p, w: 2 * m / p, "smaller of the two times, here the compute"),
    "MACs as FLOPs": (lambda m, b, p, w: max(m / p, b / w), "one FLOP per MAC"),
    "intensity in MACs": (lambda m, b, p, w: 2 * m / p if m / b >= p / w else b / w,
                          "MACs per byte with the ridge point"),
    "branches swapped": (lambda m, b, p, w: b / w if 2 * m / b >= p / w else 2 * m / p,
                         "branches swapped"),
    "milliseconds": (lambda *a: 1e3 * _time(*a), "milliseconds"),
    "microseconds": (lambda *a: 1e6 * _time(*a), "microseconds"),
    "nanoseconds": (lambda *a: 1e9 * _time(*a), "nanoseconds"),
    "no MACs divides by zero": (lambda m, b, p, w: 2 * m / min(p, 2 * m / b * w),
                                "macs=0.*divides 0 by 0"),
    "no MACs gives nan": (lambda m, b, p, w: np.nan if m == 0 else _time(m, b, p, w),
                          "macs=0"),
    "off by a constant": (lambda *a: _time(*a) + 0.5, r"expected max\(1 s of compute, 10 s"),
}


@pytest.mark.parametrize("mistake", list(TIME_MISTAKES))
def test_roofline_time_diagnoses_typical_mistakes(mistake):
    fn, message = TIME_MISTAKES[mistake]
    with np.errstate(all="ignore"), pytest.raises(ExerciseError, match=message):
        roofline_checks.roofline_time(fn)


def test_roofline_time_runs_numpy_scalars_and_huge_counts():
    seen = []
    roofline_checks.roofline_time(lambda *a: seen.append(a) or _time(*a))
    assert any(isinstance(a[0], np.integer) for a in seen)
    assert any(a[0] >= 1e15 for a in seen) and any(a[0] == 0 for a in seen)


# ----------------------------------------------------------------------------- replicas_needed

def replicas_closed_form(rate_rps, service_time_s, slo_s, quantile=0.99):
    """Solve -ln(1-q) / (mu - lambda/c) <= slo for c, round up, and return a NumPy integer."""
    tail = -np.log1p(-quantile)
    per_replica_rps = 1 / service_time_s - tail / slo_s
    if per_replica_rps <= 0:
        raise ValueError("no count of replicas meets this SLO")
    return np.int64(max(1, math.ceil(rate_rps / per_replica_rps)))


@pytest.mark.parametrize("fn", [solutions.replicas_needed, replicas_closed_form,
                                queueing.replicas_needed],
                         ids=["solution-loop", "closed-form", "labkit"])
def test_replicas_needed_accepts_correct_answers(fn, capsys):
    passes(roofline_checks.replicas_needed, fn, capsys)


def _replicas(tail=lambda q: -math.log(1 - q), rounding=math.ceil, plus=0, scale=1.0,
              stable=True):
    """A closed-form count with the typical mistakes switched on by name."""
    def fn(rate_rps, service_time_s, slo_s, quantile=0.99):
        s, slo = service_time_s * scale, slo_s * scale
        if tail(quantile) * s >= slo:
            raise ValueError("impossible")
        if not stable and rate_rps * s >= 1:
            return 1   # c = 1 "meets" the SLO: its negative quantile is below it
        return max(1, rounding(rate_rps / (1 / s - tail(quantile) / slo))) + plus
    return fn


def loop_without_stability(rate_rps, service_time_s, slo_s, quantile=0.99):
    c = 1
    while -math.log(1 - quantile) / (1 / service_time_s - rate_rps / c) > slo_s:
        c += 1
    return c


def loop_without_check(rate_rps, service_time_s, slo_s, quantile=0.99):
    c = 1
    while True:
        spare = 1 / service_time_s - rate_rps / c
        if spare > 0 and -math.log(1 - quantile) / spare <= slo_s:
            return c
        c += 1


REPLICA_MISTAKES = {
    "rounded down": (_replicas(rounding=int), "rounded down"),
    "one too many": (_replicas(plus=1), "one replica too many"),
    "the mean": (_replicas(tail=lambda q: 1.0), "MEAN response time"),
    "-ln(q)": (_replicas(tail=lambda q: -math.log(q)), r"used -ln\(q\)"),
    "log10": (_replicas(tail=lambda q: -math.log10(1 - q)), "log10"),
    "stability only": (lambda r, s, slo, q=0.99: math.ceil(r * s), "forgets the SLO"),
    "unstable allowed": (_replicas(stable=False), r"utilization 40.00 >= 1"),
    "unstable loop": (loop_without_stability, r"utilization 40.00 >= 1"),
    "milliseconds": (lambda r, s, slo, q=0.99: _replicas()(r, s * 1e3, slo * 1e3, q),
                     "mixed units"),
    "a float": (lambda *a: float(solutions.replicas_needed(*a)), "wrap it in int"),
    "not rounded": (lambda r, s, slo, q=0.99: r / (1 / s + math.log(1 - q) / slo), "math.ceil"),
    "wrong default": (lambda r, s, slo, q=0.95: solutions.replicas_needed(r, s, slo, q),
                      "default quantile=0.99"),
    "never raises": (lambda *a: 10**6 if a[:3] == (100, 0.010, 0.040) else
                     solutions.replicas_needed(*a),
                     "no count of replicas meets a 40 ms SLO: raise ValueError.*you returned"),
    "endless loop": (loop_without_check, "no answer within 5 s"),
    "off by two": (lambda *a: solutions.replicas_needed(*a) + 2,
                   r"expected 75 replicas, got 77: 75 already meet the SLO of 20 ms \(p99 19.7"),
    "two short": (lambda *a: solutions.replicas_needed(*a) - 2,
                  r"expected 75 replicas; with your 73, each replica's p99 20.37 ms misses"),
}


@pytest.mark.parametrize("mistake", list(REPLICA_MISTAKES))
def test_replicas_needed_diagnoses_typical_mistakes(mistake):
    fn, message = REPLICA_MISTAKES[mistake]
    with pytest.raises(ExerciseError, match=message):
        roofline_checks.replicas_needed(fn)


def test_replicas_needed_accepts_either_count_at_an_exact_boundary_only():
    at = (2_000, 0.002, math.log(100) / 250, 0.99)          # c = 8 meets the SLO exactly
    above = (2_000, 0.002, math.log(100) / 250 * (1 - 1e-6), 0.99)
    assert roofline_checks._answers(*at) == {8, 9}
    assert roofline_checks._answers(*above) == {9}
    assert queueing.replicas_needed(*at) in {8, 9}
