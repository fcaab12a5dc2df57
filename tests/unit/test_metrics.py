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
