"""A load generator for the served model: open-loop (Poisson) and closed-loop clients.

Open loop is how users arrive: requests come at random (a Poisson process of a given rate),
whether or not the server keeps up, so a slow server faces a growing queue. Closed loop is a
fixed set of N clients, each sending its next request when the last one is answered, so the
load eases off when the server slows down (and hides the queue that open loop exposes).
Traffic goes to loopback only, bounded in count and time; every request ends with one outcome.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import pandas as pd

LOOPBACK = ("127.0.0.1", "::1", "localhost")
# ok: 200 and the expected labels; wrong: 200 but a label differs; refused: 503, turned away by
# admission control; error: any other status, or the connection failed; timeout: no answer in time
OUTCOMES = ("ok", "wrong", "refused", "error", "timeout")
MAX_REQUESTS = 20_000      # the most any one run may send
MAX_DURATION_S = 120.0     # the longest any one run may offer load
RETRY_BACKOFF_S = (0.1, 0.3, 1.0, 2.0)


def check_loopback(url: str) -> str:
    """The URL, if it points at this machine's loopback interface; ValueError otherwise."""
    host = urlsplit(url).hostname
    if host not in LOOPBACK:
        raise ValueError("the load generator sends traffic to loopback only "
                         f"({', '.join(LOOPBACK)}), not {host!r}")
    return url.rstrip("/")


def payloads(images: np.ndarray, per_request: int = 1) -> list:
    """Request bodies made once, before any timing: JSON {"images": [...]}, `per_request` each."""
    images = np.asarray(images, np.float32)
    if images.ndim == 4:
        images = images[..., 0]
    return [json.dumps({"images": np.round(images[i:i + per_request], 4).tolist()}).encode()
            for i in range(0, len(images) - per_request + 1, per_request)]


@dataclass
class LoadRun:
    """One load run: a row per request (start, latency, status, outcome, ...), what was asked."""
    mode: str
    records: pd.DataFrame
    duration_s: float                  # the time load was offered
    offered_rps: float | None = None   # open loop: the Poisson rate
    clients: int | None = None         # closed loop: concurrent clients
    in_flight: list = field(default_factory=list)   # sampled number of requests in the system

    def summary(self) -> dict:
        """Outcome counts, p50/p95/p99 of the answered requests (ms), throughput, Little's law."""
        r, nan = self.records, float("nan")
        counts = {o: int((r["outcome"] == o).sum()) for o in OUTCOMES}
        ok = r[r["outcome"] == "ok"]
        latency_ms = 1e3 * ok["latency_s"].to_numpy()
        refused_ms = 1e3 * r.loc[r["outcome"] == "refused", "latency_s"].to_numpy()
        span_s = float((r["start_s"] + r["latency_s"]).max()) if len(r) else 0.0
        throughput = len(ok) / span_s if span_s else 0.0
        pct = (lambda q: float(np.percentile(latency_ms, q))) if len(ok) else (lambda q: nan)
        return {"mode": self.mode, "offered_rps": self.offered_rps, "clients": self.clients,
                "sent": len(r), **counts, "retried": int((r["attempts"] > 1).sum()),
                "throughput_rps": throughput,
                "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
                "max_ms": float(latency_ms.max()) if len(ok) else nan,
                "refused_p99_ms": float(np.percentile(refused_ms, 99)) if len(refused_ms) else nan,
                "mean_batch_requests": float(ok["batch_requests"].mean()) if len(ok) else nan,
                "replicas_seen": int(ok["replica"].nunique()),
                # Little's law, L = lambda * W: the sampled mean number in the system against the
                # throughput of everything answered times its mean latency.
                "in_system_sampled": float(np.mean(self.in_flight)) if self.in_flight else nan,
                "in_system_littles_law": (len(r) / span_s * float(r["latency_s"].mean())
                                          if span_s else nan),
                "duration_s": self.duration_s}

    def check_counts(self) -> None:
        """Every request sent ended with exactly one outcome (else an AssertionError)."""
        counts = self.records["outcome"].value_counts()
        unknown = set(counts.index) - set(OUTCOMES)
        assert not unknown, f"unknown outcomes {unknown}"
        assert int(counts.sum()) == len(self.records), \
            f"{counts.sum()} outcomes for {len(self.records)} requests"


async def _one(session, url: str, body: bytes, expected, timeout_s: float, retries: int) -> dict:
    """Send one request: its latency, status, outcome and what the replica said about it.

    It is sent again, up to `retries` times after a short back-off, after a connection error
    or a 5xx other than 503.
    """
    start = time.perf_counter()
    deadline = start + timeout_s
    attempts, status, answer, outcome = 0, None, None, "error"
    while True:
        attempts += 1
        try:
            left = max(0.001, deadline - time.perf_counter())
            async with session.post(url, data=body, headers={"Content-Type": "application/json"},
                                    timeout=aiohttp.ClientTimeout(total=left)) as response:
                status = response.status
                answer = await response.json(content_type=None) if status == 200 else None
        except (asyncio.TimeoutError, TimeoutError):
            status, outcome = None, "timeout"
            break
        except (aiohttp.ClientError, ValueError):
            status, outcome = None, "error"
        if status == 200:
            outcome = "ok" if answer.get("predictions") == expected else "wrong"
            break
        if status == 503:
            outcome = "refused"
            break
        if status is not None and status < 500:
            outcome = "error"
            break
        outcome = "error"   # a connection error or a 5xx: retry if allowed and time is left
        backoff = RETRY_BACKOFF_S[min(attempts - 1, len(RETRY_BACKOFF_S) - 1)]
        if attempts > retries or time.perf_counter() + backoff >= deadline:
            break
        await asyncio.sleep(backoff)
    latency = time.perf_counter() - start
    answer = answer or {}
    return {"latency_s": latency, "status": status, "outcome": outcome, "attempts": attempts,
            **{key: answer.get(key) for key in ("batch_requests", "replica", "pid", "node",
                                                "timing_us")}}


async def _sample(state: dict, samples: list, every_s: float, stop: asyncio.Event):
    while not stop.is_set():
        samples.append(state["in_flight"])
        await asyncio.sleep(every_s)


@dataclass(frozen=True)
class Offered:
    """The load one run offers: Poisson arrivals at `rate_rps` (open loop) or `clients` clients.

    For `duration_s`, at most `max_requests`; each request waits at most `timeout_s` and is
    sent again up to `retries` times.
    """
    duration_s: float
    max_requests: int
    timeout_s: float = 5.0
    retries: int = 0
    rate_rps: float | None = None
    clients: int | None = None
    seed: int = 0


async def _run(url: str, bodies: list, expected: list, offered: Offered, during=None):
    """Offer the load: (a table with a row per request, the sampled numbers in flight).

    aiohttp's client costs little CPU per request: on 2 cores the client shares the machine
    with the server it measures. `during`, if given, is called in a thread once the load starts.
    """
    state, records, samples, stop = {"in_flight": 0}, [], [], asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        sampler = asyncio.create_task(_sample(state, samples, 0.005, stop))

        async def send(i):
            state["in_flight"] += 1
            start = time.perf_counter() - t0
            try:
                k = i % len(bodies)
                row = await _one(session, url, bodies[k], expected[k], offered.timeout_s,
                                 offered.retries)
            finally:
                state["in_flight"] -= 1
            records.append({"request": i, "start_s": start, **row})

        hook = asyncio.create_task(asyncio.to_thread(during)) if during else None
        if offered.rate_rps is not None:
            await _open_arrivals(send, offered, t0)
        else:
            await _closed_clients(send, offered, t0)
        stop.set()
        await sampler
        if hook:
            await hook
    table = pd.DataFrame(records).sort_values("request").reset_index(drop=True)
    return table, samples


async def _open_arrivals(send, offered: Offered, t0: float) -> None:
    """Open loop: Poisson arrivals, whatever the server does; waits for every answer."""
    rng = np.random.default_rng(offered.seed)
    tasks, next_at, i = [], 0.0, 0
    while i < offered.max_requests:
        next_at += rng.exponential(1.0 / offered.rate_rps)
        if next_at >= offered.duration_s:
            break
        await asyncio.sleep(max(0.0, next_at - (time.perf_counter() - t0)))
        tasks.append(asyncio.create_task(send(i)))
        i += 1
    await asyncio.gather(*tasks)


async def _closed_clients(send, offered: Offered, t0: float) -> None:
    """Closed loop: each client sends its next request when the last is answered."""
    counter = iter(range(offered.max_requests))

    async def client():
        while time.perf_counter() - t0 < offered.duration_s:
            i = next(counter, None)
            if i is None:
                return
            await send(i)
    await asyncio.gather(*(client() for _ in range(offered.clients)))


def _in_own_loop(coroutine):
    """Run a coroutine to the end in a thread of its own (a Jupyter kernel runs an event loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _checked(url, bodies, expected, duration_s, timeout_s):
    url = check_loopback(url)
    if not bodies or len(bodies) != len(expected):
        raise ValueError(f"need one expected answer per body, got {len(bodies)} bodies and "
                         f"{len(expected)} answers")
    if not 0 < duration_s <= MAX_DURATION_S or not 0 < timeout_s <= 60:
        raise ValueError(f"duration_s must be in (0, {MAX_DURATION_S}] and timeout_s in (0, 60], "
                         f"got {duration_s} and {timeout_s}")
    return url + "/predict", [list(map(int, e)) for e in expected]


def open_loop(url: str, bodies: list, expected: list, *, rate_rps: float, duration_s: float,
              max_requests: int | None = None, timeout_s: float = 5.0, retries: int = 0,
              seed: int = 0, during=None) -> LoadRun:
    """Poisson arrivals at `rate_rps` for `duration_s` (at most `max_requests`), every answer.

    `expected[i]` is the list of labels that body i must get back. `during`, if given, is called
    in a thread once the load starts (to kill a replica, say). With `retries`, a request that
    fails with a connection error or a 5xx other than 503 is sent again after a short back-off.
    """
    predict, expected = _checked(url, bodies, expected, duration_s, timeout_s)
    if not 0 < rate_rps <= 5000:
        raise ValueError(f"rate_rps must be in (0, 5000], got {rate_rps}")
    cap = min(MAX_REQUESTS, max_requests or int(rate_rps * duration_s * 1.5) + 20)
    offered = Offered(duration_s, cap, timeout_s, retries, rate_rps=rate_rps, seed=seed)
    table, samples = _in_own_loop(_run(predict, bodies, expected, offered, during))
    return LoadRun("open", table, duration_s, offered_rps=rate_rps, in_flight=samples)


def closed_loop(url: str, bodies: list, expected: list, *, clients: int, duration_s: float,
                max_requests: int = MAX_REQUESTS, timeout_s: float = 5.0, retries: int = 0,
                during=None) -> LoadRun:
    """`clients` concurrent clients, each sending a request as soon as its last one is answered."""
    predict, expected = _checked(url, bodies, expected, duration_s, timeout_s)
    if not 1 <= clients <= 256:
        raise ValueError(f"clients must be in [1, 256], got {clients}")
    offered = Offered(duration_s, min(max_requests, MAX_REQUESTS), timeout_s, retries,
                      clients=clients)
    table, samples = _in_own_loop(_run(predict, bodies, expected, offered, during))
    return LoadRun("closed", table, duration_s, clients=clients, in_flight=samples)
