#!/usr/bin/env python
"""CPU per streamed token of the OpenAI-compatible provider alone (no Django request, no runtime).

    .venv/bin/python bench/stream_bench.py [--streams 400] [--tokens 100] [--concurrency 50]
        [--rounds 3] [--provider-file PATH ...]

Starts the fake upstream (agentplatform/testing/fake_openai.py) as its own process, then in this
process runs `--streams` calls of `OpenAICompatibleProvider.stream` (`[tokens:N]`, `--concurrency`
at once, uvloop when importable) and reports this process's CPU per streamed token and the time
to the first TextDelta (p50/p95). `--provider-file` (repeatable) loads another version of
agents/providers/openai_compat.py for an A/B run, e.g. the committed one:

    git show HEAD:agents/providers/openai_compat.py > /tmp/openai_compat_head.py
    .venv/bin/python bench/stream_bench.py --provider-file /tmp/openai_compat_head.py \
        --provider-file agents/providers/openai_compat.py

The versions are interleaved round by round; the summary takes medians. The last line of stdout
is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _load(path: str, index: int):
    # A sibling module of agents.providers, so its relative imports (.base) resolve.
    spec = importlib.util.spec_from_file_location(f"agents.providers._bench_{index}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _start_upstream() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "agentplatform/testing/fake_openai.py"), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"fake upstream did not start: {line!r}")
    return proc, line.rsplit(" ", 1)[1].strip()


async def _one_round(module, base_url: str, args) -> dict:
    from agents.providers.base import ModelCall, TextDelta

    provider = module.OpenAICompatibleProvider("openai", api_key="sk-bench", base_url=base_url)
    call = ModelCall(model="bench-model", messages=[{"role": "user", "content": f"go [tokens:{args.tokens}]"}])
    ttft: list[float] = []
    tokens = 0

    async def one() -> None:
        nonlocal tokens
        started = time.perf_counter()
        first = True
        async for part in provider.stream(call):
            if isinstance(part, TextDelta):
                if first:
                    ttft.append((time.perf_counter() - started) * 1000)
                    first = False
                tokens += 1

    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    await asyncio.gather(*(worker(5) for _ in range(min(args.concurrency, 10))))  # warm-up: pool, imports
    ttft.clear()
    tokens = 0
    quotient, remainder = divmod(args.streams, args.concurrency)
    per_worker = [quotient + (i < remainder) for i in range(args.concurrency)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(n) for n in per_worker))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await provider.aclose()
    assert tokens == args.streams * args.tokens, (tokens, args.streams * args.tokens)
    ttft.sort()
    return {"cpu_us_per_token": cpu / tokens * 1e6, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": ttft[len(ttft) // 2], "ttft_p95_ms": ttft[int(len(ttft) * 0.95)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--provider-file", action="append", default=[],
                        help="a version of openai_compat.py to measure (repeatable; default: the current one)")
    args = parser.parse_args()

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentplatform.settings")
    os.environ.setdefault("DEBUG", "1")
    import django

    django.setup()
    files = args.provider_file or [str(ROOT / "agents/providers/openai_compat.py")]
    modules = [_load(path, i) for i, path in enumerate(files)]
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    upstream, base_url = _start_upstream()
    results: dict[str, list[dict]] = {path: [] for path in files}
    try:
        with runner:
            for r in range(args.rounds):
                for path, module in zip(files, modules):
                    result = runner.run(_one_round(module, base_url, args))
                    results[path].append(result)
                    print(f"round {r + 1} {path}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()), flush=True)
    finally:
        upstream.terminate()
        upstream.wait(10)
    summary = {path: {k: round(statistics.median(x[k] for x in rs), 3) for k in rs[0]} for path, rs in results.items()}
    for path, figures in summary.items():
        print(f"median {path}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    print(json.dumps({"bench": "provider_stream", "streams": args.streams, "tokens": args.tokens,
                      "concurrency": args.concurrency, "rounds": args.rounds, "results": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
