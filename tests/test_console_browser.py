"""The chat console in a real browser: headless Debian Chromium driven by Playwright against a
real daphne server (its own SQLite file, DEBUG off) whose agent answers through the fake OpenAI
upstream. A staff user signs in to the admin, follows the "Chat console" link, chats (a tool
call, a slowly streamed reply, a cancelled one, a failing one), rates an answer, reopens the
session from the sidebar and continues it, all under the page's Content-Security-Policy with
no violation. The screenshot is kept as a test artifact (console.png)."""

from __future__ import annotations

import os
import re
import secrets
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (PAGE_CSP, ROOT, artifact_path, csp_directives, spawn_daphne, stop_processes, wait_ready,
                      watch_csp_violations)

pytestmark = pytest.mark.slow

AGENTS_YAML = """
agents:
  - name: assistant
    model: openai/gpt-4o-mini
    description: Answers through the upstream; uses the calculator when asked.
    skills: [calculator]
"""

SETUP = """
import io, sys
import django
django.setup()
from django.contrib.auth import get_user_model
from django.core.management import call_command
call_command("migrate", verbosity=0)
call_command("load_agents", sys.argv[1], stdout=io.StringIO())
get_user_model().objects.create_superuser("staff", "staff@example.com", sys.argv[2])
"""


class Server:
    def __init__(self, url: str, password: str, db_path: Path, log_path: Path) -> None:
        self.url = url
        self.password = password
        self.db_path = db_path
        self.log_path = log_path

    def query(self, sql: str, *params) -> list[tuple]:
        with sqlite3.connect(self.db_path, timeout=5) as db:
            return db.execute(sql, params).fetchall()


@pytest.fixture(scope="module")
def server(tmp_path_factory, fake_upstream):
    var_dir = tmp_path_factory.mktemp("console-var")
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "CACHE_URL", "CELERY_BROKER_URL", "CELERY_TASK_ALWAYS_EAGER",
                        "TEST_DATABASE_NAME", "ALLOW_INSECURE_SECRET_KEY", "READ_DOT_ENV")}
    env.update(DJANGO_SETTINGS_MODULE="agentplatform.settings", DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50),
               VAR_DIR=str(var_dir), OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=fake_upstream.base_url,
               LOG_LEVEL="WARNING")
    definitions = var_dir / "agents.yaml"
    definitions.write_text(AGENTS_YAML, encoding="utf-8")
    password = secrets.token_urlsafe(16)
    setup = subprocess.run([sys.executable, "-c", SETUP, str(definitions), password], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert setup.returncode == 0, setup.stderr

    log_path = var_dir / "daphne.log"
    process, url = spawn_daphne(env, log_path)
    try:
        wait_ready(process, url, log_path, time.monotonic() + 30)
        yield Server(url, password, var_dir / "db.sqlite3", log_path)
    finally:
        stop_processes([process])


def _hex(uuid_text: str) -> str:
    return uuid_text.replace("-", "")  # how Django stores a UUIDField in SQLite


def test_a_staff_user_chats_in_the_console(chromium, server):
    from playwright.sync_api import expect

    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    # Every request the pages make must succeed, except the favicon the admin's own pages let the
    # browser guess (the console names none). Failed loads are also logged as console errors.
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}")
            if r.status >= 400 and not r.url.endswith("/favicon.ico") else None)
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
    watch_csp_violations(page, problems)
    try:
        # Sign in to the admin with its own form, then follow the link to the console.
        page.goto(f"{server.url}/admin/")
        page.fill("#id_username", "staff")
        page.fill("#id_password", server.password)
        page.click("input[type=submit]")
        with page.expect_response(f"{server.url}/console/") as console_response:
            page.get_by_role("link", name="Chat console").click()
        page.wait_for_url(f"{server.url}/console/")
        host = server.url.split("://", 1)[1]
        assert csp_directives(console_response.value.headers["content-security-policy"]) == {
            **PAGE_CSP, "connect-src": ["'self'", f"ws://{host}", f"wss://{host}"]}

        page.select_option("#cc-agent", "assistant")
        expect(page.locator("#cc-status")).to_have_attribute("data-state", "open")  # the `ready` frame came
        page.wait_for_url(f"{server.url}/console/assistant/")
        answers = page.locator("article.cc-assistant")
        send = page.locator("#cc-send")

        # 1. A tool call and its result, shown above the answer, with the turn's usage and cost.
        page.fill("#cc-input", 'What is 17*23? [call:calculator {"expression": "17*23"}]')
        page.keyboard.press("Enter")
        first = answers.nth(0)
        expect(first.locator(".cc-chip-cost")).to_be_visible()
        expect(first.locator(".cc-tool-name")).to_have_text("calculator")
        expect(first.locator(".cc-tool .cc-pre").last).to_have_text("391")
        expect(first.locator(".cc-text")).to_contain_text("391")
        expect(first.locator(".cc-chip-tokens")).to_contain_text(" out tokens")
        session_id = page.url.split("?session=")[1]

        # 2. A reply streamed token by token: part of it is on the page while the rest is still
        #    coming (40 words, 40 ms apart), and Cancel is offered meanwhile.
        page.fill("#cc-input", "Tell me a story [tokens:40] [gap:40]")
        send.click()
        page.wait_for_function(
            "() => { const t = document.querySelector('article.cc-assistant.is-streaming .cc-text');"
            " return t && t.textContent.includes('w3 ') && !t.textContent.includes('w40'); }")
        expect(page.locator("#cc-cancel")).to_be_visible()
        second = answers.nth(1)
        expect(second.locator(".cc-chip-cost")).to_have_text(_dollars())
        expect(second.locator(".cc-text")).to_have_text(" ".join(f"w{i}" for i in range(1, 41)))
        expect(second.locator(".cc-chip-tokens")).to_contain_text("40 out tokens")
        expect(second.locator(".cc-chip-latency")).to_be_visible()
        expect(page.locator("#cc-cancel")).to_be_hidden()
        expect(second).not_to_have_class(_has("is-streaming"))

        # 3. Thumbs up sticks: the button shows it, the console's API and the database have it.
        second_run = second.get_attribute("data-run-id")
        second.locator(".cc-up").click()
        expect(second.locator(".cc-up")).to_have_attribute("aria-pressed", "true")
        stored = page.request.get(f"{server.url}/console/api/sessions/{session_id}").json()
        assert {r["id"]: r["feedback"] for r in stored["runs"]}[second_run] == 1
        assert server.query("SELECT feedback FROM agents_run WHERE id = ?", _hex(second_run)) == [(1,)]

        # 4. Cancel stops a long reply: what came is kept, the turn says it was cancelled.
        page.fill("#cc-input", "A very long answer please [tokens:400] [gap:25]")
        send.click()
        page.wait_for_function(
            "() => { const t = document.querySelector('article.cc-assistant.is-streaming .cc-text');"
            " return t && t.textContent.includes('w5 '); }")
        page.click("#cc-cancel")
        third = answers.nth(2)
        expect(third.locator(".cc-chip-flag")).to_have_text("cancelled")
        assert "w400" not in third.locator(".cc-text").text_content()
        third_run = third.get_attribute("data-run-id")
        assert server.query("SELECT status FROM agents_run WHERE id = ?", _hex(third_run)) == [("cancelled",)]

        # 5. A new chat empties the page; the session is in the sidebar and reopens whole.
        page.click("#cc-new")
        expect(page.locator(".cc-msg")).to_have_count(0)
        expect(page.locator("#cc-title")).to_have_text("New chat")
        item = page.locator(f".cc-session-button[data-session='{session_id}']")
        expect(item).to_contain_text("What is 17*23?")
        item.click()
        expect(page.locator("article.cc-user")).to_have_count(3)
        expect(answers).to_have_count(3)
        expect(item).to_have_class(_has("is-active"))
        assert page.url.endswith(f"/console/assistant/?session={session_id}")
        expect(answers.nth(0).locator(".cc-tool-name")).to_have_text("calculator")
        expect(answers.nth(1).locator(".cc-up")).to_have_attribute("aria-pressed", "true")
        expect(answers.nth(1).locator(".cc-chip-cost")).to_have_text(_dollars())
        expect(answers.nth(2).locator(".cc-chip-flag")).to_have_text("cancelled")

        # 6. ...and goes on where it stopped: the next turn lands in the same session.
        page.fill("#cc-input", "One more thing [tokens:3]")
        send.click()
        expect(answers.nth(3).locator(".cc-text")).to_have_text("w1 w2 w3")
        expect(answers.nth(3).locator(".cc-chip-cost")).to_be_visible()
        assert server.query("SELECT COUNT(*) FROM agents_run WHERE session_id = ?", _hex(session_id)) == [(4,)]
        assert server.query("SELECT COUNT(*) FROM agents_session") == [(1,)]

        # 7. A failing model shows its error frame inline, in the answer it ends; chatting goes on.
        page.fill("#cc-input", "This one fails [fault:400]")
        send.click()
        expect(answers.nth(4).locator(".cc-notice-error .cc-code")).to_have_text(re.compile(r"^upstream_"))
        expect(page.locator("#cc-status")).to_have_attribute("data-state", "open")
        expect(send).to_be_enabled()

        page.locator("#cc-log").evaluate("log => log.scrollTop = 0")
        page.screenshot(path=str(artifact_path("console.png")))
        assert problems == [], problems
    finally:
        context.close()


def _dollars() -> re.Pattern:
    return re.compile(r"^\$\d+(\.\d+)?$")


def _has(name: str) -> re.Pattern:
    return re.compile(rf"(^|\s){re.escape(name)}(\s|$)")
