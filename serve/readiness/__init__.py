"""Readiness by real inference: probes, the latency tracker and the warm-pool controller."""
