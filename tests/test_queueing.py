"""The queueing models: closed forms against the simulation, and capacity planning by hand."""
import math

import numpy as np
import pytest

from labkit import queueing


def test_replicas_needed_on_hand_worked_cases():
    # mu = 100/s, p99 = 4.605/(100 - 100/c): c=1 is unstable, c=2 gives 92 ms <= 100 ms
    assert queueing.replicas_needed(100, 0.010, 0.100) == 2
    # one replica at 10/s: p99 = 4.605/90 = 51 ms
    assert queueing.replicas_needed(10, 0.010, 0.100) == 1
    assert queueing.replicas_needed(10, 0.010, 0.050) == 2        # 51 ms > 50 ms: a second one
    # each replica may carry 100 - 4.605/0.1 = 53.95/s: 1000/s needs ceil(18.54) = 19
    assert queueing.replicas_needed(1000, 0.010, 0.100) == 19
    # the median (-ln 0.5 = 0.693) is kinder than the p99
    assert queueing.replicas_needed(1000, 0.010, 0.100, quantile=0.5) == 11


def test_replicas_needed_meets_the_slo_with_the_fewest():
    rng = np.random.default_rng(0)
    for _ in range(200):
        rate, s = rng.uniform(1, 2000), rng.uniform(1e-4, 0.05)
        q = rng.choice([0.5, 0.9, 0.99, 0.999])
        slo = s * (-math.log1p(-q)) * rng.uniform(1.01, 5)
        c = queueing.replicas_needed(rate, s, slo, q)
        p = [-math.log1p(-q) / (1 / s - rate / k) if k and rate / k < 1 / s else math.inf
             for k in (c - 1, c)]
        assert p[1] <= slo and (c == 1 or p[0] > slo)


@pytest.mark.parametrize("args, words", [
    ((100, 0.010, 0.040), "even an idle replica"),            # 4.6 x 10 ms = 46 ms > 40 ms
    ((0, 0.010, 0.100), "rate_rps must be positive"),
    ((100, -1, 0.100), "service_time_s must be positive"),
    ((100, 0.010, 0), "slo_s must be positive"),
    ((100, 0.010, 0.100, 1.0), "quantile must lie in (0, 1)"),
    ((100, 0.010, 0.100, 0), "quantile must lie in (0, 1)"),
])
def test_replicas_needed_says_why_it_cannot(args, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        queueing.replicas_needed(*args)


def test_utilization_is_rate_times_service_time_over_servers():
    assert queueing.utilization(50, 0.01) == pytest.approx(0.5)
    assert queueing.utilization(150, 0.01, servers=2) == pytest.approx(0.75)


def test_closed_forms_by_hand():
    # rho = 0.8, s = 10 ms: M/M/1 mean 50 ms, p99 4.605 x 50 ms; M/D/1 10 + 0.8 x 10 / 0.4 = 30 ms
    assert queueing.mm1_response_time(80, 0.010) == pytest.approx(0.050)
    assert queueing.mm1_quantile(80, 0.010, 0.99) == pytest.approx(math.log(100) * 0.050)
    assert queueing.mm1_quantile(80, 0.010, 0.5) == pytest.approx(math.log(2) * 0.050)
    assert queueing.md1_response_time(80, 0.010) == pytest.approx(0.030)
    assert queueing.mg1_response_time(80, [0.010]) == pytest.approx(0.030)


@pytest.mark.parametrize("model", [queueing.mm1_response_time, queueing.md1_response_time,
                                   queueing.mm1_quantile])
def test_an_unstable_queue_is_an_error_that_names_the_figures(model):
    with pytest.raises(ValueError, match=r"unstable: 100 requests/s .*utilization 1\.00"):
        model(100, 0.010)
    with pytest.raises(ValueError, match="utilization 1.50"):
        model(150, 0.010)


def test_mm1_simulation_matches_the_closed_forms():
    s, rate = 0.010, 70.0                                   # rho = 0.7
    exponential = np.random.default_rng(1).exponential(s, 100_000)
    t = queueing.simulate(rate, exponential, 200_000, seed=2)
    assert t.mean() == pytest.approx(queueing.mm1_response_time(rate, s), rel=0.05)
    assert np.percentile(t, 50) == pytest.approx(queueing.mm1_quantile(rate, s, 0.5), rel=0.05)
    assert np.percentile(t, 99) == pytest.approx(queueing.mm1_quantile(rate, s), rel=0.08)
    assert queueing.mg1_response_time(rate, exponential) == pytest.approx(
        queueing.mm1_response_time(rate, s), rel=0.03)


def test_md1_simulation_matches_pollaczek_khinchine():
    t = queueing.simulate(80, [0.010], 200_000, seed=3)
    assert t.min() == pytest.approx(0.010)                 # no request is quicker than its service
    assert t.mean() == pytest.approx(queueing.md1_response_time(80, 0.010), rel=0.05)


def test_lindley_in_closed_form_matches_the_plain_loop():
    rng = np.random.default_rng(4)
    samples = rng.uniform(0.002, 0.02, 50)
    t = queueing.simulate(90, samples, 2_000, seed=5)
    rng = np.random.default_rng(5)                         # the same draws as simulate's
    gaps, service = rng.exponential(1 / 90, 2_000), rng.choice(samples, 2_000)
    arrive, free, expected = np.cumsum(gaps), 0.0, []
    for a, s in zip(arrive, service):
        free = max(a, free) + s
        expected.append(free - a)
    np.testing.assert_allclose(t, expected, rtol=1e-9, atol=1e-12)


def test_two_servers_match_erlang_c():
    s, rate = 0.010, 150.0                                  # rho = 0.75 on each of 2 servers
    rho = rate * s / 2
    waits = 2 * rho ** 2 / (1 + rho)                        # M/M/2: P(a request waits)
    mean = s + waits / (2 / s - rate)
    exponential = np.random.default_rng(6).exponential(s, 100_000)
    t = queueing.simulate(rate, exponential, 100_000, servers=2, seed=7)
    assert t.mean() == pytest.approx(mean, rel=0.05)


def test_simulation_is_deterministic_by_seed():
    a = queueing.simulate(50, [0.005, 0.01, 0.02], 1_000, seed=11)
    np.testing.assert_array_equal(a, queueing.simulate(50, [0.005, 0.01, 0.02], 1_000, seed=11))
    assert not np.array_equal(a, queueing.simulate(50, [0.005, 0.01, 0.02], 1_000, seed=12))
    with pytest.raises(ValueError, match="service_times_s"):
        queueing.simulate(50, [], 100)


def test_latency_table_adds_the_delay_and_leaves_unstable_rates_empty():
    table = queueing.latency_table([40, 80, 120], [0.010], delay_s=0.005, n_requests=20_000)
    assert table["utilization"].tolist() == pytest.approx([0.4, 0.8, 1.2])
    assert table.loc[1, "mm1_p99_ms"] == pytest.approx(1e3 * (0.005 + math.log(100) * 0.050))
    assert table.loc[1, "mg1_mean_ms"] == pytest.approx(5 + 30)   # M/D/1, plus the delay
    assert table.loc[2, ["mm1_p99_ms", "mg1_p99_ms"]].isna().all()
    assert (table.loc[:1, "mg1_p99_ms"] < table.loc[:1, "mm1_p99_ms"]).all()  # D is kinder than M


def test_mean_batch_by_hand():
    assert queueing.mean_batch(100, 0.0, 16) == pytest.approx(1.0)
    assert queueing.mean_batch(100, 10.0, 16) == pytest.approx(16.0)
    # k = 2: a batch of 2 with p = 1 - exp(-rate x wait); per request, E[B^2] / E[B]
    p = 1 - math.exp(-100 * 0.005)
    assert queueing.mean_batch(100, 0.005, 2) == pytest.approx((1 - p + 4 * p) / (1 - p + 2 * p))
