#!/usr/bin/env python
"""What the governance pipeline costs: chat_bench.py run back to back (interleaved rounds)
against the same set-up with every stage of AGENT_PIPELINE_STAGES (input guard, feature flags,
rate limits, audit log, key usage) and without any (bench/settings_without_governance.py).

    .venv/bin/python bench/pipeline_bench.py [--rounds 2] [--seconds 4] [chat_bench options]

Prints both results and the difference: added p50 at c1 and the throughput ratio at c16.
The key used has no rate limits (the usual case); bench/governance_bench.py measures limits
and Idempotency-Key on top.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
from contextlib import redirect_stdout
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat_bench as cb  # noqa: E402


def one(extra: list[str], settings: str | None) -> dict:
    argv = [*extra, "--json-only"] + (["--settings", settings] if settings else [])
    out = io.StringIO()
    with redirect_stdout(out):
        rc = cb.main(argv)
    if rc == 2:
        raise SystemExit(f"set-up failed:\n{out.getvalue()[-2000:]}")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    args, extra = parser.parse_known_args()
    extra = extra or ["--seconds", "4"]
    runs: dict[str, list[dict]] = {"with": [], "without": []}
    for round_no in range(args.rounds):
        for name, settings in (("without", "bench.settings_without_governance"), ("with", None)):
            result = one(extra, settings)
            runs[name].append(result)
            c = result["cases"]
            print(f"round {round_no + 1} {name:>7} governance: c1 p50 {c['platform_c1']['p50_ms']:.3f} ms, "
                  f"c16 {c['platform_c16']['rps']:.1f} req/s (upstream c1 p50 {c['upstream_c1']['p50_ms']:.3f} ms)",
                  flush=True)
    med = {name: {"p50_c1": statistics.median(r["cases"]["platform_c1"]["p50_ms"] for r in rs),
                  "p99_c1": statistics.median(r["cases"]["platform_c1"]["p99_ms"] for r in rs),
                  "rps_c16": statistics.median(r["cases"]["platform_c16"]["rps"] for r in rs)}
           for name, rs in runs.items()}
    summary = {"bench": "pipeline", "rounds": args.rounds, "median": med,
               "governance_added_p50_ms_c1": round(med["with"]["p50_c1"] - med["without"]["p50_c1"], 3),
               "governance_rps_ratio_c16": round(med["with"]["rps_c16"] / med["without"]["rps_c16"], 3)}
    print(f"governance adds {summary['governance_added_p50_ms_c1']:.3f} ms p50 at c1; "
          f"throughput at c16 with it = {summary['governance_rps_ratio_c16']:.2f}x without")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
