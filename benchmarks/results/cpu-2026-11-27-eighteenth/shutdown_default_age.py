"""Evidence (eighteenth session): a stop under load with the new default connection age (8 s)
against the old one (60 s), the grace period at its default (10 s), drain delay 0.

The seventeenth session's `shutdown_under_load.py` (16 busy channels, SIGTERM, each channel's
first error) with its two modes replaced:

    age60: WARMSERVE_MAX_CONNECTION_AGE_S=60  (the old default: most connections do not reach
           their age within the stop's 10 s wait, and gRPC's stop cancels their calls)
    age8:  WARMSERVE_MAX_CONNECTION_AGE_S=8   (the new default)

    PYTHONPATH=. python benchmarks/results/cpu-2026-11-27-eighteenth/shutdown_default_age.py \
        ROUNDS FRONTENDS
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SEVENTEENTH = Path(__file__).parents[1] / "cpu-2026-11-27-seventeenth" / "shutdown_under_load.py"


def main() -> None:
    spec = importlib.util.spec_from_file_location("shutdown_under_load", SEVENTEENTH)
    assert spec is not None and spec.loader is not None
    evidence = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evidence)
    evidence.MODES = {"age60": "60", "age8": "8"}
    evidence.main()


if __name__ == "__main__":
    main()
