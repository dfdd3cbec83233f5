"""Checkers for the performance model's exercises: arithmetic intensity, the roofline's time, and
the replicas a tail-latency SLO needs.

The references are `roofline.arithmetic_intensity`, `roofline.roofline_time` and
`queueing.replicas_needed` (M/M/1 replicas). A wrong answer is compared with the typical mistakes
below, and the message names the one it matches.
"""
from __future__ import annotations

import math
import numbers
import signal
import threading

import numpy as np

from labkit import queueing, roofline
from labkit.check import ExerciseError, exercise, fail


def _real(result):
    """The learner's number as a float, or None when it is not one finite real number."""
    if isinstance(result, np.ndarray) and result.size == 1:
        result = result.item()
    if isinstance(result, bool) or not isinstance(result, numbers.Real):
        return None
    value = float(result)
    return value if math.isfinite(value) else None


def _close(a, b) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=1e-6)   # float32 answers pass too


class _TooSlow(Exception):
    """The learner's function ran past its time (a loop that never ends)."""


def _within(seconds: float, call, *args):
    """call(*args), stopped after `seconds` where a timer can be set (Unix, the main thread)."""
    if (not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread()
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):   # a timer of someone else's runs
        return call(*args)

    def stop(signum, frame):
        raise _TooSlow()
    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return call(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _expect_value_error(name: str, call, args, why: str) -> None:
    try:
        result = _within(5, call, *args)
    except ExerciseError as error:
        cause = error.__cause__
        if isinstance(cause, ValueError):
            return
        if isinstance(cause, _TooSlow):
            fail(name, f"{why}, and your function gave no answer within 5 s (a loop that never "
                       "ends?): check first, and raise ValueError", args)
        fail(name, f"{why}: raise ValueError with a message that says so, not "
                   f"{type(cause).__name__}", args)
    fail(name, f"{why}: raise ValueError with a message that says so; you returned {result!r}",
         args)


# ----------------------------------------------------------------------------- arithmetic_intensity

def _moved(wc, wb, ac, ab, wbits=None, abits=None, per_byte=8):
    return wc * (wbits or wb) / per_byte + ac * (abits or ab) / per_byte


# (message, what the mistake returns for (macs, weight_count, weight_bits, activation_count,
# activation_bits)); tried in this order on the first case that fails
_INTENSITY_MISTAKES = [
    ("you used // (floor division): the intensity is a ratio, often below 1; divide with /",
     lambda m, wc, wb, ac, ab: math.floor(2 * m / _moved(wc, wb, ac, ab))),
    ("you used bits as bytes: a weight of weight_bits bits takes weight_bits / 8 bytes",
     lambda m, wc, wb, ac, ab: 2 * m / _moved(wc, wb, ac, ab, per_byte=1)),
    ("you forgot the activations: the op also reads its input and writes its output, "
     "activation_count values of activation_bits / 8 bytes each",
     lambda m, wc, wb, ac, ab: 2 * m / (wc * wb / 8) if wc else None),
    ("you forgot the weights: they are read from memory too, weight_count * weight_bits / 8 bytes",
     lambda m, wc, wb, ac, ab: 2 * m / (ac * ab / 8) if ac else None),
    ("you used the MACs as FLOPs: a multiply-accumulate is 2 FLOPs (a multiply and an add)",
     lambda m, wc, wb, ac, ab: m / _moved(wc, wb, ac, ab)),
    ("you ignored activation_bits (counted 4 bytes per activation): int8 activations take 1",
     lambda m, wc, wb, ac, ab: 2 * m / _moved(wc, wb, ac, ab, abits=32)),
    ("you ignored weight_bits (counted 4 bytes per weight): int8 weights take 1 byte, 4-bit ones "
     "half a byte", lambda m, wc, wb, ac, ab: 2 * m / _moved(wc, wb, ac, ab, wbits=32)),
    ("you returned the inverse, bytes per FLOP: the intensity is FLOPs per byte moved",
     lambda m, wc, wb, ac, ab: _moved(wc, wb, ac, ab) / (2 * m) if m else None),
    ("you returned bytes per MAC: the intensity is FLOPs (2 per MAC) per byte moved",
     lambda m, wc, wb, ac, ab: _moved(wc, wb, ac, ab) / m if m else None),
]

# (macs, weight_count, weight_bits, activation_count, activation_bits): worked by hand
_INTENSITY_BY_HAND = [
    (150, 10, 32, 15, 32),                 # 300 FLOPs / (40 + 60) B = 3.0
    (401_408, 401_408, 32, 3_264, 32),     # the baseline's dense1: 802,816 / 1,618,688 B ~ 0.50
    (401_408, 401_408, 8, 3_264, 32),      # int8 weights, float activations: 802,816 / 414,464
    (401_408, 401_408, 8, 3_264, 8),       # all int8: 802,816 / 404,672 ~ 1.98
    (3_612_672, 18_432, 32, 18_816, 32),   # conv2: 7,225,344 / 148,992 B ~ 48.5
    (64 * 401_408, 401_408, 32, 64 * 3_264, 32),   # dense1 on a batch of 64: ~ 21
    (1000, 1000, 4, 100, 8),               # 4-bit weights: 2000 / (500 + 100) B
    (0, 0, 32, 6_272, 32),                 # a reshape: no arithmetic, intensity 0
]


def _judge_intensity(call, case, keyword=False) -> None:
    m, wc, wb, ac, ab = case
    args, kwargs = (case[:4], {"activation_bits": ab}) if keyword else (case, {})
    result = call(*args, **kwargs)
    expected = roofline.arithmetic_intensity(m, wc, wb, ac, ab)
    got = _real(result)
    if got is None:
        fail("arithmetic_intensity", f"return one finite number (a float), got {result!r}", args,
             kwargs)
    if isinstance(result, numbers.Integral) or np.asarray(result).dtype.kind in "iu":
        why = ("you used // (floor division)" if got == math.floor(expected)
               else "you returned an integer")
        fail("arithmetic_intensity", f"{why}: return a float, FLOPs per byte as a ratio (here "
                                     f"{expected:.6g}); got {result!r}", args, kwargs)
    if _close(got, expected):
        return
    for message, mistake in _INTENSITY_MISTAKES:
        value = mistake(m, wc, wb, ac, ab)
        if value is not None and not _close(value, expected) and _close(got, value):
            fail("arithmetic_intensity", f"{message}. Expected {expected:.6g}, got {got:.6g}.",
                 args, kwargs)
    fail("arithmetic_intensity", f"expected {2 * m:,} FLOPs / {_moved(wc, wb, ac, ab):,g} bytes = "
                                 f"{expected:.6g}, got {got:.6g}", args, kwargs)


@exercise("arithmetic_intensity", "01", "roofline.arithmetic_intensity",
          "arithmetic_intensity(macs, weight_count, weight_bits, activation_count, "
          "activation_bits=32) -> float")
def arithmetic_intensity(call):
    """FLOPs (2 per MAC) per byte of weights and activations moved: 8 cases by hand, 30 random
    ones against roofline.arithmetic_intensity, and a ValueError when nothing is moved."""
    if not _close(_real(call(150, 10, 32, 15)), 3.0) and _close(_real(call(150, 10, 32, 15, 32)),
                                                                 3.0):
        fail("arithmetic_intensity", "called without activation_bits your answer differs: keep "
                                     "the default activation_bits=32", (150, 10, 32, 15))
    for i, case in enumerate(_INTENSITY_BY_HAND):
        _judge_intensity(call, case, keyword=i == 3)   # int8 activations given by name
    rng = np.random.default_rng(901)
    cases = 30
    for i in range(cases):
        wc, ac = int(rng.integers(0, 10_000_000)), int(rng.integers(1, 1_000_000))
        case = (int(rng.integers(0, 10**9)), wc, int(rng.choice([2, 4, 8, 16, 32])), ac,
                int(rng.choice([8, 16, 32])))
        _judge_intensity(call, tuple(np.int64(v) for v in case) if i % 3 == 2 else case,
                         keyword=i % 2 == 1)
    _expect_value_error("arithmetic_intensity", call, (100, 0, 8, 0, 8),
                        "nothing is moved (no weights, no activations), so FLOPs per byte is "
                        "undefined")
    return (f"{len(_INTENSITY_BY_HAND)} cases by hand, {cases} random ones against "
            "roofline.arithmetic_intensity, and nothing moved")


# ----------------------------------------------------------------------------- roofline_time

# (message, what the mistake returns for (macs, bytes_moved, peak, bandwidth)); in this order
_TIME_MISTAKES = [
    ("you added the two times: that is the no-overlap model; the roofline assumes compute and "
     "memory traffic overlap, so the slower one bounds the time: max(compute_s, memory_s)",
     lambda m, b, p, w: 2 * m / p + b / w),
    ("you picked the bound by comparing an intensity in MACs per byte with the ridge point "
     "peak / bandwidth, which is in FLOPs per byte, so near the ridge you chose the wrong one: "
     "count 2 FLOPs per MAC, or simply take max(compute_s, memory_s)",
     lambda m, b, p, w: 2 * m / p if b and m / b >= p / w else b / w),
    ("you counted one FLOP per MAC: a multiply-accumulate is 2 FLOPs, so the compute time is "
     "2 * macs / peak_flops_per_s", lambda m, b, p, w: max(m / p, b / w)),
    *((f"your time is in {unit}: return seconds",
       lambda m, b, p, w, f=factor: f * roofline.roofline_time(m, b, p, w))
      for unit, factor in [("milliseconds", 1e3), ("microseconds", 1e6), ("nanoseconds", 1e9)]),
]

# (macs, bytes_moved, peak_flops_per_s, bandwidth_bytes_per_s): worked by hand
_TIME_BY_HAND = [
    (500, 1000, 1000.0, 100.0),            # compute 1 s, memory 10 s: 10 s, memory-bound
    (3_612_672, 148_992, 1e11, 1e10),      # conv2: compute 72.3 µs, memory 14.9 µs
    (401_408, 1_618_688, 1e11, 1e10),      # dense1: compute 8.0 µs, memory 161.9 µs
    (600, 100, 1000.0, 100.0),             # near the ridge: compute 1.2 s, memory 1 s
    (0, 6_272, 1e11, 1e10),                # a reshape: no arithmetic, 0.63 µs of memory traffic
    (10**15, 10**12, 1e15, 3e12),          # huge: compute 2 s, memory 0.33 s
    (np.int64(3_612_672), np.int64(148_992), np.float64(1e11), np.float64(1e10)),   # NumPy
]


def _judge_time(call, case) -> None:
    m, b, p, w = case
    expected = roofline.roofline_time(m, b, p, w)
    try:
        got = _real(call(m, b, p, w))
    except ExerciseError as error:
        if m or not isinstance(error.__cause__, ZeroDivisionError):
            raise
        got = None
    if got is None and m == 0:
        fail("roofline_time", "with macs=0 (a reshape moves bytes and does no arithmetic) the time "
                              "is bytes_moved / bandwidth; an intensity-based formula divides 0 by "
                              "0 here: take max(compute_s, memory_s)", case)
    if got is None:
        fail("roofline_time", f"return one finite number of seconds, expected {expected:.6g}",
             case)
    if _close(got, expected):
        return
    for message, mistake in _TIME_MISTAKES:
        value = mistake(m, b, p, w)
        if not _close(value, expected) and _close(got, value):
            fail("roofline_time", f"{message}. Expected {expected:.6g} s, got {got:.6g}.", case)
    compute_s, memory_s = 2 * m / p, b / w
    smaller = min((compute_s, "compute"), (memory_s, "memory"))
    if _close(got, smaller[0]):
        fail("roofline_time", f"you returned the smaller of the two times, here the {smaller[1]} "
                              "time (min, only one of the two, or the roofline's branches "
                              "swapped): the op cannot finish before its slower part, so the time "
                              f"is max(compute_s, memory_s) = {expected:.6g} s, got {got:.6g}",
             case)
    fail("roofline_time", f"expected max({compute_s:.6g} s of compute, {memory_s:.6g} s of memory "
                          f"traffic) = {expected:.6g} s, got {got:.6g}", case)


@exercise("roofline_time", "01", "roofline.roofline_time",
          "roofline_time(macs, bytes_moved, peak_flops_per_s, bandwidth_bytes_per_s) -> float")
def roofline_time(call):
    """Seconds, the larger of the compute time at peak and the memory time at bandwidth: 7 cases
    by hand (no MACs, huge counts, NumPy scalars), then 30 random ones against
    roofline.roofline_time."""
    for case in _TIME_BY_HAND:
        _judge_time(call, case)
    rng = np.random.default_rng(902)
    cases = 30
    for i in range(cases):
        m, b, p, w = 10 ** rng.uniform([3, 3, 9, 8], [12, 10, 15, 13])
        case = (int(m), int(b), float(p), float(w))
        _judge_time(call, tuple(np.float64(v) for v in case) if i % 3 == 2 else case)
    return f"{len(_TIME_BY_HAND)} cases by hand, {cases} random ones against roofline.roofline_time"


# ----------------------------------------------------------------------------- replicas_needed

def _threshold(rate, s, slo, tail):
    """The real c at which each replica's quantile meets the SLO exactly (None: no c does)."""
    per_replica_rps = 1 / s - tail / slo
    return rate / per_replica_rps if per_replica_rps > 0 else None


def _replicas(rate, s, slo, tail):
    c = _threshold(rate, s, slo, tail)
    return None if c is None else max(1, math.ceil(c))


def _tail(q):   # -ln(1 - q): the q-quantile of an exponential time, in units of its mean
    return -math.log1p(-q)


# (message, what the mistake returns for (rate_rps, service_time_s, slo_s, quantile)); in order
_REPLICA_MISTAKES = [
    ("you rounded down (int() or math.floor): the count must reach the threshold, round up with "
     "math.ceil", lambda r, s, slo, q: int(_threshold(r, s, slo, _tail(q)))),
    ("one replica too many: the smallest c whose quantile is <= slo_s is enough",
     lambda r, s, slo, q: queueing.replicas_needed(r, s, slo, q) + 1),
    ("you kept the MEAN response time 1 / (mu - lambda) within the SLO: the quantile q of an "
     "exponential response time is -ln(1 - q) / (mu - lambda)",
     lambda r, s, slo, q: _replicas(r, s, slo, 1.0)),
    ("you used -ln(q): the q-quantile of an exponential time is -ln(1 - q) / rate (the time by "
     "which a share q of the requests has finished)",
     lambda r, s, slo, q: _replicas(r, s, slo, -math.log(q))),
    ("you used log10: math.log is the natural logarithm the exponential distribution needs",
     lambda r, s, slo, q: _replicas(r, s, slo, -math.log10(1 - q))),
    ("your count only aims at keeping each replica busy less than all the time (rate_rps * "
     "service_time_s / c <= 1) and forgets the SLO, or reads the SLO in the wrong unit",
     lambda r, s, slo, q: math.ceil(r * s)),
    ("mixed units: about 1000 times too many, as if the times had been turned into milliseconds "
     "while the rate stayed per second: keep the times in seconds, the rate per second",
     lambda r, s, slo, q: _replicas(r, s * 1e3, slo * 1e3, _tail(q))),
]

# (rate_rps, service_time_s, slo_s, quantile): worked by hand
_REPLICAS_BY_HAND = [
    (20_000, 0.002, 0.020, 0.99),   # 40 busy; at 75 the p99 is 4.605 / (500 - 266.7) = 19.7 ms
    (2_000, 0.002, 0.020, 0.99),    # at 8: 4.605 / 250 = 18.4 ms; at 7: 21.5 ms
    (1_000, 0.005, 0.050, 0.5),     # the median: ln 2 / (200 - 1000 / c) <= 50 ms at c = 6
    (300, 0.004, 0.050, 0.999),     # -ln(0.001) = 6.9: 3 replicas
    (10, 0.002, 0.020, 0.99),       # a light load: one replica is plenty
    (2_000, 0.002, math.log(100) / 250, 0.99),            # exactly 8: 8 (or 9, by rounding)
    (2_000, 0.002, math.log(100) / 250 * (1 - 1e-6), 0.99),   # just above 8: 9
    (2_000, 0.002, math.log(100) / 250 * (1 + 1e-6), 0.99),   # just below 8: 8
]


def _answers(r, s, slo, q) -> set:
    """The right counts: the reference's, and both neighbours within 1e-9 of a boundary."""
    c = _threshold(r, s, slo, _tail(q))
    if abs(c - round(c)) <= 1e-9 * max(c, 1):
        return {max(1, round(c)), round(c) + 1}
    return {queueing.replicas_needed(r, s, slo, q)}


def _judge_replicas(call, case) -> None:
    r, s, slo, q = case
    result = call(*case)
    right = _answers(*case)
    if isinstance(result, bool) or not isinstance(result, (numbers.Integral, np.integer)):
        got = _real(result)
        how = "math.ceil returns one, np.ceil a float: wrap it in int()" if got is not None \
            and got.is_integer() else "round up with math.ceil"
        fail("replicas_needed", f"return a whole number of replicas as an int ({how}); got "
                                f"{result!r}, expected {min(right)}", case)
    got = int(result)
    if got in right:
        return
    for message, mistake in _REPLICA_MISTAKES:
        value = mistake(r, s, slo, q)
        if value is not None and value not in right and got == value:
            fail("replicas_needed", f"{message}. Expected {min(right)}, got {got}.", case)
    if got < 1 or r * s / got >= 1:
        fail("replicas_needed", f"with {got} replica(s) each is offered {r / max(got, 1):,.6g} "
                                f"requests/s but finishes only {1 / s:,.6g}/s (utilization "
                                f"{r * s / max(got, 1):.2f} >= 1): its queue grows without bound, "
                                "and the formula's negative 'quantile' is no pass. Require "
                                f"1/service_time_s - rate_rps/c > 0 first; expected {min(right)}",
             case)
    def p_ms(c):
        return f"p{q * 100:g} {1e3 * _tail(q) / (1 / s - r / c):.4g} ms"
    fewest = min(right)
    if got > fewest:
        fail("replicas_needed", f"expected {fewest} replicas, got {got}: {fewest} already meet the "
                                f"SLO of {slo * 1e3:.4g} ms ({p_ms(fewest)}); return the fewest",
             case)
    fail("replicas_needed", f"expected {fewest} replicas; with your {got}, each replica's "
                            f"{p_ms(got)} misses the SLO of {slo * 1e3:.4g} ms", case)


@exercise("replicas_needed", "09", "queueing.replicas_needed",
          "replicas_needed(rate_rps, service_time_s, slo_s, quantile=0.99) -> int")
def replicas_needed(call):
    """The fewest M/M/1 replicas whose response-time quantile meets the SLO: 8 cases by hand (at,
    just above and just below a boundary), 30 random ones against queueing.replicas_needed, and a
    ValueError when no count can meet the SLO."""
    if call(20_000, 0.002, 0.020) != call(20_000, 0.002, 0.020, 0.99):
        fail("replicas_needed", "called without quantile your answer differs: keep the default "
                                "quantile=0.99", (20_000, 0.002, 0.020))
    for case in _REPLICAS_BY_HAND:
        _judge_replicas(call, case)
    rng = np.random.default_rng(909)
    cases = 30
    for _ in range(cases):
        q = float(rng.choice([0.5, 0.9, 0.95, 0.99, 0.999]))
        r, s = 10 ** rng.uniform(0, 4.7), 10 ** rng.uniform(-4, -1.3)
        _judge_replicas(call, (float(r), float(s), float(_tail(q) * s * rng.uniform(1.1, 30)), q))
    _expect_value_error("replicas_needed", call, (100, 0.010, 0.040, 0.99),
                        "even an idle replica's p99 is -ln(1 - 0.99) x 10 ms = 46 ms, so no count "
                        "of replicas meets a 40 ms SLO")
    return (f"{len(_REPLICAS_BY_HAND)} cases by hand, {cases} random ones against "
            "queueing.replicas_needed, and an SLO no count can meet")
