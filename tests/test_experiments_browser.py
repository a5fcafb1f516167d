"""The experiments admin in a real browser: a daphne server (DEBUG off, its own SQLite file) and
Debian's Chromium driven by Playwright. Sign in, open the experiment with its variants inline,
its results page (tables and the Chart.js charts), pause and resume it, then promote the winner:
the agent takes the variant's configuration and the experiment is finished. Screenshots are kept
as test artifacts (experiment-change.png, experiment-results.png, experiment-promoted.png)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

import pytest

from conftest import (PAGE_CSP, ROOT, artifact_path, csp_directives, spawn_daphne, stop_processes, wait_ready,
                      watch_csp_violations)

pytestmark = pytest.mark.slow

# Runs made directly (with fixed figures from a seeded generator, started "now" whatever the
# day): 300 per variant, the treatment faster, cheaper and better rated.
SETUP = """
import json, random, sys, uuid
from datetime import timedelta
from decimal import Decimal
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from django.contrib.auth import get_user_model
from django.utils import timezone
from agents.models import Agent, Message, Run, Session
from billing.models import UsageRecord
from experiments.models import ShadowRun
from experiments.results import experiment_results
from experiments.services import experiment_create

get_user_model().objects.create_superuser("boss", "boss@example.com", sys.argv[1])
agent = Agent.objects.create(name="writer", model="local/demo", system_prompt="Write well.")
experiment = experiment_create(
    agent_name="writer", name="concise-prompt", status="running", min_sample=200, actor="system",
    description="Does a concise prompt on a smaller model answer as well, faster and cheaper?",
    variants=[{"name": "control", "weight": 50, "is_control": True},
              {"name": "concise", "weight": 50, "model": "local/concise", "system_prompt": "Be concise."}],
    shadow_variant="concise", shadow_percent=10)
rng = random.Random(13)
now = timezone.now()
plan = {"control": dict(latency=900, spread=250, error=0.06, cost=0.0021, up=0.62),
        "concise": dict(latency=700, spread=200, error=0.04, cost=0.0012, up=0.71)}
runs, usage = [], []
for variant, p in plan.items():
    for i in range(300):
        failed = rng.random() < p["error"]
        rated = rng.random() < 0.7
        run = Run(id=uuid.uuid4(), agent=agent, transport="rest", started_at=now - timedelta(seconds=i),
                  finished_at=now, status="failed" if failed else "succeeded",
                  latency_ms=max(50, int(rng.gauss(p["latency"], p["spread"]))), total_tokens=rng.randint(200, 400),
                  variant=variant, experiment_id=experiment.id, model=agent.model,
                  feedback=(1 if rng.random() < p["up"] else -1) if rated and not failed else None)
        runs.append(run)
        usage.append(UsageRecord(created_at=now, run=run, agent=agent, model=agent.model, variant=variant,
                                 cost_usd=Decimal(str(round(max(0.0, rng.gauss(p["cost"], p["cost"] / 4)), 8))),
                                 prompt_tokens=200, completion_tokens=100, starts_run=True))
Run.objects.bulk_create(runs)
UsageRecord.objects.bulk_create(usage)
session = Session.objects.create(agent=agent, title="shadowed")
live = runs[1]
live.session = session
live.save(update_fields=["session"])
Message.objects.create(session=session, run=live, role="assistant", content="The live answer, long and careful.",
                       created_at=now)
ShadowRun.objects.create(experiment=experiment, variant="concise", live_run=live, status="succeeded",
                         model="local/concise", output="The shadow answer.", latency_ms=321,
                         cost_usd=Decimal("0.0009"), prompt_tokens=200, completion_tokens=40, finished_at=now)
print(json.dumps({"id": experiment.id, "results": experiment_results(experiment)}))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    var_dir = tmp_path_factory.mktemp("experiments-var")
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "CACHE_URL", "CELERY_BROKER_URL", "CELERY_TASK_ALWAYS_EAGER",
                        "TEST_DATABASE_NAME", "METRICS_TOKEN", "ALLOW_INSECURE_SECRET_KEY", "READ_DOT_ENV")}
    env.update(DJANGO_SETTINGS_MODULE="agentplatform.settings", DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50),
               VAR_DIR=str(var_dir), LOG_LEVEL="WARNING", SERVE_STATIC="true")
    password = secrets.token_urlsafe(16)
    setup = subprocess.run([sys.executable, "-c", SETUP, password], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=180)
    assert setup.returncode == 0, setup.stderr
    facts = json.loads(setup.stdout.strip().splitlines()[-1])
    artifact_path("experiment-results.json").write_text(json.dumps(facts["results"], indent=2))
    log_path = var_dir / "daphne.log"
    process, url = spawn_daphne(env, log_path)
    try:
        wait_ready(process, url, log_path, time.monotonic() + 30)
        yield {"url": url, "password": password, **facts}
    finally:
        stop_processes([process])


def test_the_experiment_admin_and_results_page_in_a_browser(server, chromium):
    context = chromium.new_context(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: problems.append(f"console: {message.text}")
            if message.type == "error" and not message.text.startswith("Failed to load resource") else None)
    page.on("response", lambda response: problems.append(f"{response.status} {response.url}")
            if response.status >= 400 and not response.url.endswith("favicon.ico") else None)
    watch_csp_violations(page, problems)
    base, experiment_id = server["url"], server["id"]
    try:
        page.goto(f"{base}/admin/experiments/experiment/")
        page.fill("#id_username", "boss")
        page.fill("#id_password", server["password"])
        page.click("input[type=submit]")
        page.wait_for_url("**/admin/experiments/experiment/", timeout=15_000)
        row = page.locator("#result_list tbody tr", has_text="concise-prompt")
        assert "control 50% / concise 50%" in row.inner_text() and "Running" in row.inner_text()

        page.goto(f"{base}/admin/experiments/experiment/{experiment_id}/change/")
        assert page.input_value("#id_variants-1-name") == "concise"
        assert page.input_value("#id_variants-1-model") == "local/concise"
        assert page.input_value("#id_variants-0-weight") == "50"
        page.screenshot(path=str(artifact_path("experiment-change.png")), full_page=True)

        results_url = f"{base}/admin/experiments/experiment/{experiment_id}/results/"
        assert page.get_attribute("a[href$='/results/']", "href").endswith(f"/{experiment_id}/results/")
        response = page.goto(results_url)
        assert response.status == 200
        assert csp_directives(response.headers["content-security-policy"]) == PAGE_CSP
        page.wait_for_selector("body[data-charts-ready='4']", timeout=15_000)
        painted = page.evaluate("""() => [...document.querySelectorAll('canvas')].map(c => {
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 3; i < d.length; i += 4) { if (d[i] > 0) n++; } return n; })""")
        assert len(painted) == 4 and min(painted) > 500, painted

        expected = {v["name"]: v for v in server["results"]["variants"]}
        for name in ("control", "concise"):
            cells = page.locator(f"#xp-variants tr[data-variant='{name}'] td")
            assert cells.nth(2).inner_text() == str(expected[name]["requests"]) == "300"
            assert cells.nth(7).inner_text() == expected[name]["cost_per_request_usd"]
        latency = page.locator("#xp-comparisons tr[data-metric='latency_ms'] td")
        reference = next(c for c in server["results"]["comparisons"] if c["metric"] == "latency_ms")
        assert latency.nth(6).inner_text() == f"{reference['p_value']:.4g}"
        assert "significant" in latency.nth(8).inner_text()
        assert page.locator("#xp-comparisons tbody tr").count() == 4
        side = page.locator("#xp-shadow-runs tbody tr").first.inner_text()
        assert "The live answer" in side and "The shadow answer." in side and "321" in side
        page.screenshot(path=str(artifact_path("experiment-results.png")), full_page=True)

        page.click("#xp-pause")
        page.wait_for_selector("#xp-status:text('paused')", timeout=15_000)
        page.click("#xp-resume")
        page.wait_for_selector("#xp-status:text('running')", timeout=15_000)

        page.click(".xp-promote[data-variant='concise']")
        page.wait_for_selector("#xp-status:text('finished')", timeout=15_000)
        assert "Promoted 'concise'" in page.inner_text(".messagelist")
        assert page.locator(".xp-promote").count() == 0  # finished: read-only
        page.screenshot(path=str(artifact_path("experiment-promoted.png")), full_page=True)

        page.goto(f"{base}/admin/agents/agent/")
        agent_row = page.locator("#result_list tbody tr", has_text="writer").inner_text()
        assert "local/concise" in agent_row
        page.goto(f"{base}/admin/governance/auditlog/?q=experiment:concise-prompt")
        assert "experiment.promoted" in page.inner_text("#result_list")
        assert problems == []
    finally:
        context.close()
