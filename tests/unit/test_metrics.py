"""Per-model counters recorded on the request path and what Prometheus scrapes from them."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serve.telemetry.metrics import Metrics


def _samples(metrics: Metrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def test_outcomes_durations_and_batch_sizes_are_scraped_per_model():
    metrics = Metrics()
    a, b = metrics.counters("a"), metrics.counters("b")
    assert metrics.counters("a") is a, "versions of one model share its counters"
    for seconds in (0.0004, 0.0015, 0.0015, 7.0):
        a.request_ok(seconds)
    a.request_failed("invalid_input")
    b.request_failed("queue_full")
    for rows in (1, 3, 3, 64):
        a.batch(rows)
    s = _samples(metrics)
    assert s['warmserve_requests_total{code="ok",model="a"}'] == 4
    assert s['warmserve_requests_total{code="invalid_input",model="a"}'] == 1
    assert s['warmserve_requests_total{code="queue_full",model="b"}'] == 1
    # cumulative buckets: ≤ 0.5 ms holds 1, ≤ 2 ms holds 3, +Inf holds all 4
    assert s['warmserve_request_duration_seconds_bucket{le="0.0005",model="a"}'] == 1
    assert s['warmserve_request_duration_seconds_bucket{le="0.002",model="a"}'] == 3
    assert s['warmserve_request_duration_seconds_bucket{le="5.0",model="a"}'] == 3
    assert s['warmserve_request_duration_seconds_bucket{le="+Inf",model="a"}'] == 4
    assert s['warmserve_request_duration_seconds_count{model="a"}'] == 4
    assert abs(s['warmserve_request_duration_seconds_sum{model="a"}'] - 7.0034) < 1e-9
    assert s['warmserve_batch_rows_bucket{le="1.0",model="a"}'] == 1
    assert s['warmserve_batch_rows_bucket{le="4.0",model="a"}'] == 3
    assert s['warmserve_batch_rows_bucket{le="64.0",model="a"}'] == 4
    assert s['warmserve_batch_rows_sum{model="a"}'] == 71
    assert s['warmserve_batch_rows_count{model="b"}'] == 0


def _counter_series(metrics: Metrics) -> dict[str, float]:
    """Every counter sample of a scrape (histogram buckets, counts and sums included)."""
    return {
        name: value
        for name, value in _samples(metrics).items()
        if name.startswith(("warmserve_requests_total", "warmserve_warm_up_"))
        or "_bucket{" in name
        or "_count{" in name
        or "_sum{" in name
    }


def _assert_none_went_down(before: dict[str, float], after: dict[str, float]) -> None:
    for name, value in before.items():
        assert after.get(name, 0.0) >= value, f"{name} went from {value} to {after.get(name)}"


def test_counters_never_go_down_when_the_warm_up_ends():
    """A scrape during the warm-up and one after it: every counter series only grew. The
    warm-up's own calls are counted apart (warmserve_warm_up_*), not in the user series."""
    metrics = Metrics(warm_up=True)
    a = metrics.counters("a")
    for _ in range(3):  # the front end's loopback warm-up calls
        a.batch(1)
        a.request_ok(0.001)
    a.request_failed("deadline_exceeded")
    during = _counter_series(metrics)
    assert during['warmserve_warm_up_requests_total{code="ok",model="a"}'] == 3
    assert 'warmserve_requests_total{code="ok",model="a"}' not in during
    assert during['warmserve_request_duration_seconds_count{model="a"}'] == 0

    a.reset()  # ModelService.forget_warm_up(), as the gate opens
    metrics.warm_up_over()
    a.request_ok(0.002)  # user traffic
    a.batch(2)
    after = _counter_series(metrics)
    _assert_none_went_down(during, after)
    assert after['warmserve_requests_total{code="ok",model="a"}'] == 1
    assert after['warmserve_request_duration_seconds_count{model="a"}'] == 1
    assert after['warmserve_batch_rows_sum{model="a"}'] == 2
    assert after['warmserve_warm_up_requests_total{code="ok",model="a"}'] == 3
    assert after['warmserve_warm_up_requests_total{code="deadline_exceeded",model="a"}'] == 1
    assert after['warmserve_warm_up_batch_rows_total{model="a"}'] == 3


def test_a_reset_after_the_warm_up_or_without_one_drops_nothing():
    warmed = Metrics(warm_up=True)
    warmed.counters("a")
    warmed.warm_up_over()
    for metrics in (Metrics(), warmed):  # (Metrics(): the in-process Runtime's)
        a = metrics.counters("a")
        a.request_ok(0.001)
        a.batch(4)
        before = _counter_series(metrics)
        a.reset()  # a second forget_warm_up(), say
        after = _counter_series(metrics)
        _assert_none_went_down(before, after)
        assert after['warmserve_requests_total{code="ok",model="a"}'] == 1


def test_a_model_not_ready_at_the_warm_up_s_end_and_one_loaded_later_count_user_traffic():
    metrics = Metrics(warm_up=True)
    late = metrics.counters("late")  # never warmed through the front end: no reset() of its own
    late.request_failed("unavailable")
    metrics.warm_up_over()
    late.request_ok(0.001)
    metrics.counters("loaded").request_ok(0.001)  # loaded by model control afterwards
    s = _samples(metrics)
    assert s['warmserve_requests_total{code="ok",model="late"}'] == 1
    assert s['warmserve_warm_up_requests_total{code="unavailable",model="late"}'] == 1
    assert s['warmserve_requests_total{code="ok",model="loaded"}'] == 1
    assert not any("warm_up" in name and "loaded" in name for name in s)


def test_the_cpu_limit_and_its_throttling_are_scraped_as_its_cpu_stat_says_now():
    from serve.cpus import LimitStat

    metrics = Metrics()
    now: list[LimitStat | None] = [LimitStat(1.5, 400, 30, 2.25)]
    metrics.watch_cpu_limit(lambda: now[0])
    s = _samples(metrics)
    assert s["warmserve_cpu_limit_cpus{}"] == 1.5
    assert s["warmserve_cpu_limit_periods_total{}"] == 400
    assert s["warmserve_cpu_limit_throttled_periods_total{}"] == 30
    assert s["warmserve_cpu_limit_throttled_seconds_total{}"] == 2.25
    now[0] = LimitStat(1.5, 410, 36, 2.5)
    assert _samples(metrics)["warmserve_cpu_limit_throttled_periods_total{}"] == 36
    now[0] = None  # cpu.stat unreadable: no series rather than made-up zeros
    assert not any(name.startswith("warmserve_cpu_limit") for name in _samples(metrics))
