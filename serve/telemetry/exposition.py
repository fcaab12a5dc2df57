"""Merging the Prometheus expositions of several front-end processes into one scrape.

Each process keeps its own registry; the supervisor scrapes them all and labels every sample
with the process it came from (``frontend="0"``, ...), so sums and rates over the label give
the server's totals and nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merge_expositions(expositions: dict[str, str], label: str) -> bytes:
    """One exposition of every family in ``expositions`` (source name → text format), each
    sample labelled ``label=<source name>``."""
    merged: dict[str, Metric] = {}
    for source, text in expositions.items():
        for family in text_string_to_metric_families(text):
            target = merged.get(family.name)
            if target is None:
                target = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = target
            for sample in family.samples:
                target.add_sample(
                    sample.name,
                    {**sample.labels, label: source},
                    sample.value,
                    sample.timestamp,
                    sample.exemplar,
                )
    return generate_latest(_Families(merged.values()))
