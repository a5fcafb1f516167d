#!/usr/bin/env python
"""The platform beside LiteLLM Proxy and Portkey's gateway, same upstream, same load generator.

    .venv/bin/python bench/gateway_bench.py [--rounds 5] [--seconds 5] [--warmup 300]
        [--targets platform,litellm,portkey] [--server gunicorn] [--workers 1] [--install]

Self-contained, like bench/chat_bench.py (whose set-up, processes and load generator it uses):
the fake OpenAI upstream (agentplatform/testing/fake_openai.py, echo mode, no added latency),
then, all pointed at it:

    platform   this repository, DEBUG off, a temporary SQLite database (--database-url /
               --redis-url for PostgreSQL / Redis), served as scripts/prod.sh serves it (gunicorn
               + uvicorn's worker, --workers 1 by default: one process, as the others), agent
               `bench` (model openai/bench-model), a client key; POST /v1/chat/completions
    litellm    LiteLLM Proxy (`litellm[proxy]` from PyPI, in its own virtualenv, default
               bench/.venvs/litellm), one worker, a config routing model `bench-model` to the
               fake (openai/bench-model at its base URL), a random master key (it refuses to
               start without one), no database
    portkey    Portkey's gateway (`@portkey-ai/gateway` from npm, default under
               /tmp/agentplatform-bench/portkey), `node build/start-server.js --port=N`, the
               provider given per request: `x-portkey-provider: openai`,
               `x-portkey-custom-host: <fake>/v1`

--install creates what is missing (pip install into the LiteLLM virtualenv, npm install in the
Portkey directory); without it a missing one is skipped, saying how to install it.

Every round measures, for the upstream directly and for each target, in an order that rotates
from round to round (no target always runs first or last):

    c1         one connection, non-streamed: p50 / p99 latency; added = target - upstream
    c16        --concurrency connections, non-streamed: throughput (req/s)
    stream c1  one connection, stream=true: time to the first SSE event (TTFT); overhead =
               target TTFT - upstream TTFT

then prints per-round tables, the medians over rounds, and the ratios: the platform's c16
throughput over LiteLLM's and Portkey's, and its added latency and TTFT overhead beside
theirs. The last line of stdout is one JSON object. Run it on a quiet machine: "other load"
(CPU used by anything but the measured processes) should stay near 0, else rerun; the figures
in docs/benchmarks.md say on what box they were taken.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import chat_bench as cb  # noqa: E402  (set-up, processes and the load generator)

DEFAULT_LITELLM_VENV = ROOT / "bench" / ".venvs" / "litellm"
DEFAULT_PORTKEY_DIR = Path("/tmp/agentplatform-bench/portkey")
PORTKEY_PACKAGE = "@portkey-ai/gateway"
TARGETS = ("platform", "litellm", "portkey")
# Seen with @portkey-ai/gateway 1.15.2 (and 1.9.8) on Node 20: every stream=true chat completion
# answers 500 "Something went wrong", the gateway logging "TypeError: immutable" from
# updateHeaders: Portkey-AI/gateway issues 1389 and 1550.
PORTKEY_STREAM_NOTE = "; known Portkey bug on Node: 'TypeError: immutable' in updateHeaders, Portkey-AI/gateway#1550"

LITELLM_CONFIG = """model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: {base_url}
      api_key: sk-bench
litellm_settings:
  telemetry: false
  drop_params: true
general_settings:
  master_key: {master_key}
"""


class Skip(Exception):
    """A target that cannot run here (not installed, failed to start): skipped, with the reason."""


# --------------------------------------------------------------------------- the other gateways

def ensure_litellm(venv: Path, install: bool, log: Path) -> Path:
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    if not install:
        raise Skip(f"LiteLLM is not installed in {venv} (run with --install, or: python3 -m venv {venv} && "
                   f"{venv}/bin/pip install 'litellm[proxy]')")
    with log.open("ab") as out:
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=out, stderr=out)
        result = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                                 "litellm[proxy]"], stdout=out, stderr=out)
    if result.returncode != 0 or not exe.exists():
        raise Skip(f"pip install 'litellm[proxy]' into {venv} failed (see {log})")
    return exe


def ensure_portkey(directory: Path, install: bool, log: Path) -> Path:
    script = directory / "node_modules" / PORTKEY_PACKAGE / "build" / "start-server.js"
    if script.exists():
        if shutil.which("node") is None:
            raise Skip("node is not on PATH")
        return script
    if not install:
        raise Skip(f"Portkey's gateway is not installed in {directory} (run with --install, or: "
                   f"mkdir -p {directory} && cd {directory} && npm install {PORTKEY_PACKAGE})")
    if shutil.which("npm") is None:
        raise Skip("npm is not on PATH (Debian: apt-get install npm)")
    directory.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        if not (directory / "package.json").exists():
            subprocess.run(["npm", "init", "-y"], cwd=directory, stdout=out, stderr=out)
        result = subprocess.run(["npm", "install", "--no-audit", "--no-fund", PORTKEY_PACKAGE], cwd=directory,
                                stdout=out, stderr=out)
    if result.returncode != 0 or not script.exists():
        raise Skip(f"npm install {PORTKEY_PACKAGE} in {directory} failed (see {log})")
    return script


def probe(port: int, request: bytes) -> bytes:
    """One request on a fresh connection (Connection: close): the whole raw response."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request.replace(b"Accept: */*\r\n", b"Accept: */*\r\nConnection: close\r\n", 1))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def wait_answering(port: int, proc: subprocess.Popen, log: Path, request: bytes, timeout: float = 120.0) -> None:
    """Until `request` (a chat completion) answers 200: a gateway is ready when it serves one."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Skip(f"it exited ({proc.returncode}):\n{cb.log_tail(log)}")
        try:
            data = probe(port, request)
            if data.startswith(b"HTTP/1.1 200"):
                return
            last = data[:300].decode(errors="replace")
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise Skip(f"it did not answer a chat completion within {timeout:.0f}s (last: {last})\n{cb.log_tail(log)}")


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the summary takes medians")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per case")
    parser.add_argument("--warmup", type=int, default=300, help="warm-up requests before each case")
    parser.add_argument("--concurrency", type=int, default=16, help="connections of the throughput case")
    parser.add_argument("--targets", default=",".join(TARGETS), help="which of platform,litellm,portkey")
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming (TTFT) case")
    parser.add_argument("--server", choices=["daphne", "uvicorn", "gunicorn"], default="gunicorn",
                        help="the platform's server (default gunicorn + uvicorn's worker, as scripts/prod.sh)")
    parser.add_argument("--workers", type=int, default=1, help="the platform's worker processes (default 1)")
    parser.add_argument("--database-url", default="", help="the platform's DATABASE_URL (default: a temp SQLite)")
    parser.add_argument("--redis-url", default="", help="the platform's REDIS_URL (default: none)")
    parser.add_argument("--litellm-venv", type=Path, default=DEFAULT_LITELLM_VENV)
    parser.add_argument("--portkey-dir", type=Path, default=DEFAULT_PORTKEY_DIR)
    parser.add_argument("--install", action="store_true", help="install LiteLLM / Portkey when missing")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    if unknown := set(targets) - set(TARGETS):
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if args.rounds < 1 or args.seconds <= 0 or args.concurrency < 1:
        parser.error("--rounds, --seconds and --concurrency must be positive")

    def say(*a) -> None:
        if not args.json_only:
            print(*a, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    log = tmp / "bench.log"
    procs = cb.Procs()
    skipped: dict[str, str] = {}
    ports: dict[str, int] = {}
    requests: dict[tuple[str, bool], bytes] = {}
    servers: dict[str, subprocess.Popen] = {}
    no_stream: dict[str, str] = {}  # targets whose streamed completions fail here, and why
    try:
        env = cb.bench_env(tmp, database_url=args.database_url, redis_url=args.redis_url)
        fake_url, fake_port, fake = cb.start_upstream(procs, env, log)
        env["OPENAI_BASE_URL"] = fake_url
        ports["upstream"] = fake_port
        for stream in (False, True):
            requests[("upstream", stream)] = cb.build_request(
                "127.0.0.1", fake_port, "/v1/chat/completions", cb.chat_body(cb.UPSTREAM_MODEL, stream), "sk-bench")
        say(f"gateway bench: upstream {fake_url}; temp dir {tmp}")

        for target in targets:
            try:
                if target == "platform":
                    port, key, proc = cb.start_platform(procs, env, tmp, log, server=args.server,
                                                        workers=args.workers)
                    for stream in (False, True):
                        requests[(target, stream)] = cb.build_request(
                            "127.0.0.1", port, "/v1/chat/completions", cb.chat_body(cb.AGENT, stream), key)
                    detail = f"{args.server}, {args.workers} worker(s)"
                elif target == "litellm":
                    exe = ensure_litellm(args.litellm_venv, args.install, log)
                    config = tmp / "litellm.yaml"
                    master_key = "sk-" + secrets.token_hex(16)  # it refuses to start without one
                    config.write_text(LITELLM_CONFIG.format(model=cb.UPSTREAM_MODEL, base_url=fake_url,
                                                            master_key=master_key))
                    port = cb.free_port()
                    lenv = {k: v for k, v in os.environ.items() if k not in cb.STRIPPED_ENV
                            and not k.startswith(("LITELLM", "OPENAI"))}
                    lenv.update(LITELLM_TELEMETRY="False", LITELLM_LOG="ERROR", PYTHONUNBUFFERED="1")
                    proc = procs.start("litellm", [str(exe), "--config", str(config), "--host", "127.0.0.1",
                                                   "--port", str(port), "--num_workers", "1"], lenv,
                                       tmp / "litellm.log")
                    for stream in (False, True):
                        requests[(target, stream)] = cb.build_request(
                            "127.0.0.1", port, "/v1/chat/completions", cb.chat_body(cb.UPSTREAM_MODEL, stream),
                            master_key)
                    wait_answering(port, proc, tmp / "litellm.log", requests[(target, False)])
                    detail = f"{exe.parent.parent}"
                else:
                    script = ensure_portkey(args.portkey_dir, args.install, log)
                    port = cb.free_port()
                    penv = {k: v for k, v in os.environ.items() if k not in cb.STRIPPED_ENV}
                    proc = procs.start("portkey", ["node", str(script), f"--port={port}"], penv, tmp / "portkey.log")
                    headers = {"x-portkey-provider": "openai", "x-portkey-custom-host": fake_url}
                    for stream in (False, True):
                        requests[(target, stream)] = cb.build_request(
                            "127.0.0.1", port, "/v1/chat/completions", cb.chat_body(cb.UPSTREAM_MODEL, stream),
                            "sk-bench", headers=headers)
                    wait_answering(port, proc, tmp / "portkey.log", requests[(target, False)])
                    detail = f"{script}"
            except (Skip, cb.SetupError) as exc:
                skipped[target] = str(exc)
                say(f"SKIPPED {target}: {exc}")
                continue
            ports[target], servers[target] = port, proc
            say(f"{target}: http://127.0.0.1:{port}/v1 (pid {proc.pid}; {detail})")
            if not args.no_stream:
                answer = probe(port, requests[(target, True)])
                if not (answer.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in answer):
                    status = answer.split(b"\r\n", 1)[0].decode(errors="replace")
                    body = answer.rsplit(b"\r\n\r\n", 1)[-1][:120].decode(errors="replace")
                    no_stream[target] = (f"a streamed chat completion fails ({status}; {body})"
                                         + (PORTKEY_STREAM_NOTE if target == "portkey" else ""))
                    say(f"  {target}: no streaming case: {no_stream[target]}")
        if not servers:
            raise cb.SetupError("no target could be started")

        measured = ["upstream", *servers]
        kinds = [("c1", 1, False), (f"c{args.concurrency}", args.concurrency, False)]
        if not args.no_stream:
            kinds.append(("stream c1", 1, True))
        rounds: dict[str, list[dict]] = {}
        with asyncio.Runner(loop_factory=cb._new_loop) as runner:
            for rnd in range(args.rounds):
                order = measured[rnd % len(measured):] + measured[:rnd % len(measured)]
                say(f"\nround {rnd + 1}/{args.rounds} (order: {', '.join(order)}): {args.seconds:g}s per case "
                    f"after {args.warmup} warm-up requests")
                say(cb.HEADER.replace("case          ", "case                 "))
                for kind, conc, stream in kinds:
                    for target in order:
                        if stream and target in no_stream:
                            continue
                        pids = {"server": (servers[target] if target in servers else fake).pid,
                                "upstream": fake.pid, "client": os.getpid()}
                        if target == "upstream":
                            pids["server"] = fake.pid
                        r = runner.run(cb.run_case("127.0.0.1", ports[target], requests[(target, stream)],
                                                   concurrency=conc, warmup=args.warmup, seconds=args.seconds,
                                                   stream=stream, pids=pids))
                        name = f"{target} {kind}"
                        rounds.setdefault(name, []).append(r)
                        say(cb.fmt_row(f"{name:<21}", r))
                        for sample in r.get("error_samples", []):
                            say(f"    error: {sample}")
        for target, proc in servers.items():
            if proc.poll() is not None:
                raise cb.SetupError(f"{target} died during the run")
        rss = {target: cb.peak_rss_mb(proc.pid) for target, proc in servers.items()}
    except cb.SetupError as exc:
        print(f"gateway bench: set-up failed: {exc}", file=sys.stderr)
        print(f"(logs in {tmp})", file=sys.stderr)
        args.keep = True
        return 2
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    summary = {name: cb.median_case(rs) for name, rs in rounds.items()}
    hi = f"c{args.concurrency}"
    up1, uph = summary["upstream c1"], summary[f"upstream {hi}"]
    result: dict = {"bench": "gateways", "rounds": args.rounds, "seconds_per_case": args.seconds,
                    "warmup": args.warmup, "concurrency": args.concurrency, "cpus": os.cpu_count(),
                    "platform_server": f"{args.server} x{args.workers}", "skipped": skipped,
                    "stream_skipped": no_stream,
                    "upstream": {f"rps_{hi}": uph["rps"], "p50_ms_c1": up1["p50_ms"]}, "targets": {}}
    errors = sum(r["errors"] for r in summary.values())
    if args.rounds > 1:
        say(f"\nmedians over {args.rounds} rounds (spread: min..max req/s)")
        say(cb.HEADER.replace("case          ", "case                 "))
        for name, r in summary.items():
            say(cb.fmt_row(f"{name:<21}", r) + f"   [{r['rps_spread'][0]:.0f}..{r['rps_spread'][1]:.0f} req/s]")
    say("")
    say(f"{'target':<10} {hi + ' req/s':>11} {'added p50 c1':>13} {'added p99 c1':>13} {'TTFT overhead':>14} "
        f"{'server cpu ms/req':>18} {'peak RSS MB':>12}")
    for target in servers:
        c1, chi = summary[f"{target} c1"], summary[f"{target} {hi}"]
        row = {f"rps_{hi}": chi["rps"], "added_p50_ms_c1": round(c1["p50_ms"] - up1["p50_ms"], 3),
               "added_p99_ms_c1": round(c1["p99_ms"] - up1["p99_ms"], 3),
               "server_cpu_ms_per_req": chi["cpu_ms_per_req"]["server"], "peak_rss_mb": rss[target]}
        if not args.no_stream and target not in no_stream:
            st, ust = summary[f"{target} stream c1"], summary["upstream stream c1"]
            row["ttft_overhead_p50_ms"] = round(st["first_event_p50_ms"] - ust["first_event_p50_ms"], 3)
        result["targets"][target] = row
        ttft = f"{row['ttft_overhead_p50_ms']:>11.3f} ms" if "ttft_overhead_p50_ms" in row else f"{'-':>14}"
        say(f"{target:<10} {row[f'rps_{hi}']:>11.1f} {row['added_p50_ms_c1']:>10.3f} ms {row['added_p99_ms_c1']:>10.3f} ms "
            f"{ttft} {row['server_cpu_ms_per_req']:>18.3f} {rss[target] or 0:>12.1f}")
    say(f"{'upstream':<10} {uph['rps']:>11.1f}   (direct, the ceiling)")
    ratios = {}
    if "platform" in result["targets"]:
        mine = result["targets"]["platform"]
        for other in ("litellm", "portkey"):
            if other in result["targets"]:
                theirs = result["targets"][other]
                ratios[f"platform_vs_{other}_{hi}"] = round(mine[f"rps_{hi}"] / max(theirs[f"rps_{hi}"], 0.1), 2)
                say(f"platform / {other}: {hi} throughput {ratios[f'platform_vs_{other}_{hi}']:.2f}x; added p50 c1 "
                    f"{mine['added_p50_ms_c1']:.3f} ms vs {theirs['added_p50_ms_c1']:.3f} ms"
                    + (f"; TTFT overhead {mine['ttft_overhead_p50_ms']:.3f} ms vs {theirs['ttft_overhead_p50_ms']:.3f} ms"
                       if "ttft_overhead_p50_ms" in mine and "ttft_overhead_p50_ms" in theirs else ""))
        ratios[f"platform_vs_upstream_{hi}"] = round(mine[f"rps_{hi}"] / max(uph["rps"], 0.1), 4)
    result["ratios"] = ratios
    result["errors"] = errors
    busy = max(r["other_load_cores"] for r in summary.values())
    result["max_other_load_cores"] = busy
    if errors:
        say(f"ERRORS: {errors} failed requests: the figures do not count")
    if busy >= 0.3:
        say(f"note: other processes used up to {busy:.2f} cores during the run: rerun on a quiet machine")
    for target, reason in skipped.items():
        say(f"skipped {target}: {reason.splitlines()[0]}")
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0 if not errors and not skipped else 1


if __name__ == "__main__":
    sys.exit(main())
