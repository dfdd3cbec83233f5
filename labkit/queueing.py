"""Queueing models of a server: predict latency against offered load before measuring it.

Closed forms for M/M/1 and M/D/1 (Pollaczek-Khinchine), a FIFO simulation whose service times
are drawn from measured samples (M/G/c), and capacity planning with `replicas_needed`.
Times are in seconds and rates in requests per second, as the names say.
"""
from __future__ import annotations

import heapq
import math

import numpy as np
import pandas as pd


def _positive(**figures) -> None:
    for name, value in figures.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")


def _quantile_ok(quantile: float) -> None:
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}")


def utilization(rate_rps: float, service_time_s: float, servers: int = 1) -> float:
    """rho = lambda * s / c: the share of time the servers are busy (1 or more: unstable)."""
    return rate_rps * service_time_s / servers


def _stable(rate_rps: float, service_time_s: float, servers: int = 1) -> float:
    """The utilization, or a ValueError that names the figures when the queue cannot drain."""
    _positive(rate_rps=rate_rps, service_time_s=service_time_s)
    rho = utilization(rate_rps, service_time_s, servers)
    if rho >= 1:
        raise ValueError(
            f"unstable: {rate_rps:g} requests/s offered to {servers} server(s) that each finish "
            f"{1 / service_time_s:.4g} requests/s (utilization {rho:.2f} >= 1): the queue grows "
            "without bound and has no steady-state latency")
    return rho


def mm1_response_time(rate_rps: float, service_time_s: float) -> float:
    """Mean response time (wait + service) of M/M/1: s / (1 - rho)."""
    return service_time_s / (1 - _stable(rate_rps, service_time_s))


def mm1_quantile(rate_rps: float, service_time_s: float, quantile: float = 0.99) -> float:
    """The `quantile` of M/M/1 FIFO response time, exponential with rate mu - lambda."""
    _quantile_ok(quantile)
    _stable(rate_rps, service_time_s)
    return -math.log1p(-quantile) / (1 / service_time_s - rate_rps)


def md1_response_time(rate_rps: float, service_time_s: float) -> float:
    """Mean response time of M/D/1 (Pollaczek-Khinchine): s + rho * s / (2 (1 - rho))."""
    rho = _stable(rate_rps, service_time_s)
    return service_time_s + rho * service_time_s / (2 * (1 - rho))


def mg1_response_time(rate_rps: float, service_times_s) -> float:
    """Mean response time of M/G/1 (Pollaczek-Khinchine) from service-time samples:
    E[S] + lambda E[S^2] / (2 (1 - rho)); M/D/1 and M/M/1 are its two best-known cases."""
    samples = _samples(service_times_s)
    rho = _stable(rate_rps, float(samples.mean()))
    return float(samples.mean() + rate_rps * np.mean(samples ** 2) / (2 * (1 - rho)))


def _samples(service_times_s) -> np.ndarray:
    samples = np.asarray(service_times_s, dtype=float).ravel()
    if samples.size == 0 or not np.all(np.isfinite(samples)) or samples.min() < 0:
        raise ValueError("service_times_s must be a non-empty set of finite times >= 0 s")
    if samples.mean() <= 0:
        raise ValueError("service_times_s must not all be zero")
    return samples


def simulate(rate_rps: float, service_times_s, n_requests: int, *, servers: int = 1,
             seed: int = 0) -> np.ndarray:
    """Response times (s) of `n_requests` through a FIFO queue with `servers` servers (M/G/c).

    Arrivals are Poisson at `rate_rps`; each request's service time is drawn, with replacement,
    from the samples given (measured ones, say). One server follows Lindley's recursion,
    W[n] = max(0, W[n-1] + S[n-1] - A[n]), in closed form; several keep a heap of the times at
    which each server is next free. The same seed gives the same answer. An unstable queue
    (utilization >= 1) is simulated too: its latencies then grow with `n_requests`.
    """
    samples = _samples(service_times_s)
    _positive(rate_rps=rate_rps, n_requests=n_requests, servers=servers)
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate_rps, n_requests)
    service = rng.choice(samples, n_requests)
    if servers == 1:
        # W[n] = C[n] - min(C[0..n]), C the running sum of S[n-1] - A[n] from C[0] = 0
        steps = np.concatenate([[0.0], service[:-1] - gaps[1:]])
        climb = np.cumsum(steps)
        wait = climb - np.minimum.accumulate(climb)
        return wait + service
    arrivals, free = np.cumsum(gaps), [0.0] * int(servers)
    finish = np.empty(n_requests)
    for i, (arrive, work) in enumerate(zip(arrivals, service)):
        finish[i] = max(arrive, heapq.heappop(free)) + work
        heapq.heappush(free, finish[i])
    return finish - arrivals


def latency_table(rates_rps, service_times_s, delay_s: float = 0.0, *,
                  n_requests: int = 20_000, seed: int = 0) -> pd.DataFrame:
    """Predicted latency (ms) against offered load: a row per rate, the queue plus `delay_s`.

    `delay_s` is a fixed time outside the queue (the client, the network); the queue's service
    time is the mean of `service_times_s`. M/M/1 columns come from the closed form, M/G/1 ones
    from `simulate` with the samples themselves. Rates at which the queue is unstable get NaN.
    """
    samples = _samples(service_times_s)
    s = float(samples.mean())
    rows = []
    for rate in rates_rps:
        row = {"offered_rps": float(rate), "utilization": utilization(rate, s)}
        if row["utilization"] < 1:
            t = simulate(rate, samples, n_requests, seed=seed)
            in_queue_s = {"mm1_p50": mm1_quantile(rate, s, 0.5), "mm1_p99": mm1_quantile(rate, s),
                          "mg1_mean": mg1_response_time(rate, samples),
                          "mg1_p50": np.percentile(t, 50), "mg1_p99": np.percentile(t, 99)}
            row.update({f"{k}_ms": 1e3 * (v + delay_s) for k, v in in_queue_s.items()})
        rows.append(row)
    columns = ["offered_rps", "utilization", "mm1_p50_ms", "mm1_p99_ms", "mg1_mean_ms",
               "mg1_p50_ms", "mg1_p99_ms"]
    return pd.DataFrame(rows).reindex(columns=columns)


def mean_batch(rate_rps: float, wait_s: float, max_batch_size: int) -> float:
    """Requests per batch, averaged over requests, when a batch closes once full or `wait_s`
    after its first request, at Poisson arrivals (time in the model call not counted).

    A batch holds 1 + min(k - 1, N) requests, N ~ Poisson(rate x wait). Averaged over requests,
    as a server that reports each answer's batch size is, this is E[B^2] / E[B].
    """
    _positive(rate_rps=rate_rps, max_batch_size=max_batch_size)
    if wait_s < 0:
        raise ValueError(f"wait_s must be >= 0, got {wait_s}")
    m, expected = int(max_batch_size) - 1, rate_rps * wait_s
    pmf = np.exp(-expected) * np.cumprod([1.0] + [expected / j for j in range(1, m + 1)])
    pmf[-1] = max(0.0, 1 - pmf[:-1].sum())        # N >= k - 1: the batch is full
    size = 1 + np.arange(m + 1)
    return float(np.sum(pmf * size ** 2) / np.sum(pmf * size))


def replicas_needed(rate_rps: float, service_time_s: float, slo_s: float,
                    quantile: float = 0.99) -> int:
    """Fewest replicas that keep the `quantile` of response time within `slo_s`.

    Requests are spread evenly at random over c replicas, each an M/M/1 queue with arrival rate
    rate_rps/c and service rate 1/service_time_s, whose response time is exponential with rate
    mu - lambda: its q-quantile is -ln(1-q) / (1/service_time_s - rate_rps/c).
    """
    _positive(rate_rps=rate_rps, service_time_s=service_time_s, slo_s=slo_s)
    _quantile_ok(quantile)
    tail = -math.log1p(-quantile)           # -ln(1-q): the quantile in units of 1/(mu - lambda)
    if tail * service_time_s >= slo_s:
        raise ValueError(
            f"no number of replicas meets a p{quantile * 100:g} of {slo_s * 1e3:g} ms: even an "
            f"idle replica's p{quantile * 100:g} is {tail * service_time_s * 1e3:.3g} ms "
            f"(-ln(1-q) x a service time of {service_time_s * 1e3:g} ms)")
    per_replica_rps = 1 / service_time_s - tail / slo_s   # the most one replica may carry

    def meets(c: int) -> bool:
        spare = 1 / service_time_s - rate_rps / c
        return spare > 0 and tail / spare <= slo_s

    c = max(1, math.ceil(rate_rps / per_replica_rps))
    while c > 1 and meets(c - 1):        # floating point may round the division either way
        c -= 1
    while not meets(c):
        c += 1
    return c
