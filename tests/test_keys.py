"""API keys: the admin REST API and its roles, secrets shown once, rotation and its grace
period, revocation (also seen by another server process), the console's rotate action, the
rotate_api_keys command and the cheap last_used_at stamp."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import stat
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import httpx
import pytest
from django.conf import settings as django_settings
from django.core.cache import cache
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from agents.models import Session
from conftest import ROOT, Api, assert_error, orm, spawn_daphne, stop_processes, wait_ready
from governance.keys import forget_key_usage
from governance.models import ApiKey, AuditLog
from governance.services import api_key_revoke

KEYS = "/api/v1/admin/api-keys"
SECRET_RE = re.compile(r"ap_[0-9a-f]+_[A-Za-z0-9_-]+")


# --- helpers --------------------------------------------------------------------------------


def api(secret: str | None = None) -> APIClient:
    client = APIClient()
    if secret:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def key_of(secret: str) -> ApiKey:
    return ApiKey.objects.get(prefix=secret.split("_")[1])


def authenticates(secret: str) -> bool:
    """Whether the key gets through authentication (a sync endpoint: same selectors as chat)."""
    status = api(secret).get("/api/v1/agents").status_code
    assert status in (200, 401), status
    return status == 200


def post(secret: str | None, path: str, body: dict | None = None):
    return api(secret).post(path, body if body is not None else {}, format="json")


def patch(secret: str | None, path: str, body: dict):
    return api(secret).patch(path, body, format="json")


def every_stored_value(key: ApiKey) -> str:
    key.refresh_from_db()
    return " ".join(str(getattr(key, f.attname)) for f in ApiKey._meta.concrete_fields)


@pytest.fixture
def admin_key(make_key) -> str:
    return make_key("admin")


@pytest.fixture
def target(make_key) -> str:
    """A client key for the admin to manage."""
    return make_key("client")


# --- roles on the admin API -----------------------------------------------------------------

ENDPOINTS = [
    ("get", KEYS, None),
    ("post", KEYS, {"name": "x", "role": "client"}),
    ("get", KEYS + "/{prefix}", None),
    ("patch", KEYS + "/{prefix}", {"name": "renamed"}),
    ("post", KEYS + "/{prefix}/rotate", {}),
    ("post", KEYS + "/{prefix}/revoke", {}),
]


def call(secret: str | None, method: str, path: str, body: dict | None):
    client = api(secret)
    if method == "get":
        return client.get(path)
    return getattr(client, method)(path, body or {}, format="json")


@pytest.mark.django_db
@pytest.mark.parametrize("method, path, body", ENDPOINTS)
def test_it_asks_for_a_key_on_the_admin_api(target, method, path, body):
    response = call(None, method, path.format(prefix=key_of(target).prefix), body)

    assert_error(response, 401, "invalid_api_key")


@pytest.mark.django_db
@pytest.mark.parametrize("role", ["client", "developer"])
@pytest.mark.parametrize("method, path, body", ENDPOINTS)
def test_it_refuses_the_admin_api_to_other_roles(make_key, target, role, method, path, body):
    caller = make_key(role)
    before = every_stored_value(key_of(target))
    count = ApiKey.objects.count()

    response = call(caller, method, path.format(prefix=key_of(target).prefix), body)

    error = assert_error(response, 403, "permission_denied")
    assert "admin role" in error["message"]
    assert every_stored_value(key_of(target)) == before
    assert ApiKey.objects.count() == count
    assert authenticates(target)


@pytest.mark.django_db
@pytest.mark.parametrize("method, path, body", ENDPOINTS)
def test_it_serves_the_admin_api_to_admin_keys(admin_key, target, method, path, body):
    response = call(admin_key, method, path.format(prefix=key_of(target).prefix), body)

    assert response.status_code in (200, 201), response.content


@pytest.mark.django_db
def test_it_refuses_a_revoked_admin_key(admin_key):
    api_key_revoke(api_key=key_of(admin_key))

    assert_error(api(admin_key).get(KEYS), 401, "invalid_api_key")


# --- create ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_creates_a_key_and_shows_its_secret_only_then(admin_key, make_agent):
    make_agent(name="demo", skills=["calculator"])
    expires = timezone.now() + timedelta(days=30)

    response = post(admin_key, KEYS, {"name": "billing bot", "role": "developer", "agents": ["demo"],
                                      "allowed_skills": ["calculator"], "rate_limit_rpm": 60,
                                      "rate_limit_tpm": 10_000, "expires_at": expires.isoformat()})

    assert response.status_code == 201, response.content
    body = response.json()
    secret = body["key"]
    assert re.fullmatch(rf"ap_{body['prefix']}_[A-Za-z0-9_-]{{43}}", secret)
    assert {k: body[k] for k in ("name", "role", "all_agents", "agents", "all_skills", "allowed_skills",
                                 "rate_limit_rpm", "rate_limit_tpm", "status", "enabled", "revoked_at",
                                 "rotated_at")} == {
        "name": "billing bot", "role": "developer", "all_agents": False, "agents": ["demo"], "all_skills": False,
        "allowed_skills": ["calculator"],
        "rate_limit_rpm": 60, "rate_limit_tpm": 10_000, "status": "active", "enabled": True,
        "revoked_at": None, "rotated_at": None}
    assert "secret_hash" not in body and "previous_secret_hash" not in body

    stored = key_of(secret)
    assert stored.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in every_stored_value(stored)
    assert stored.expires_at == expires.replace(microsecond=stored.expires_at.microsecond)
    assert authenticates(secret)

    # Never again: not in the list, not in the detail, and no hash either.
    for page in (api(admin_key).get(KEYS), api(admin_key).get(f"{KEYS}/{stored.prefix}")):
        assert page.status_code == 200
        text = page.content.decode()
        assert secret not in text
        assert secret.split("_", 2)[2] not in text
        assert stored.secret_hash not in text
        assert "hash" not in text


@pytest.mark.django_db
def test_it_creates_a_key_for_all_agents_with_defaults(admin_key):
    response = post(admin_key, KEYS, {"name": "ci", "role": "client"})

    assert response.status_code == 201
    body = response.json()
    assert (body["all_agents"], body["agents"], body["all_skills"], body["allowed_skills"], body["rate_limit_rpm"],
            body["expires_at"]) == (True, [], True, [], None, None)
    assert key_of(body["key"]).created_by is None


@pytest.mark.django_db
@pytest.mark.parametrize("body, param", [
    pytest.param({"name": "x", "role": "client", "rate_limt_rpm": 5}, "rate_limt_rpm", id="unknown-field"),
    pytest.param({"name": "x", "role": "client", "key": "ap_mine_x"}, "key", id="the-secret"),
    pytest.param({"name": "x", "role": "client", "prefix": "abc"}, "prefix", id="read-only-field"),
    pytest.param({"name": "x", "role": "client", "agents": ["nope"]}, "agents", id="unknown-agent"),
    pytest.param({"name": "x", "role": "client", "allowed_skills": ["nope"]}, "allowed_skills", id="unknown-skill"),
    pytest.param({"name": "x", "role": "owner"}, "role", id="bad-role"),
    pytest.param({"role": "client"}, "name", id="no-name"),
    pytest.param({"name": "", "role": "client"}, "name", id="empty-name"),
    pytest.param({"name": "x", "role": "client", "rate_limit_rpm": 0}, "rate_limit_rpm", id="zero-rpm"),
    pytest.param({"name": "x", "role": "client", "rate_limit_tpm": "lots"}, "rate_limit_tpm", id="text-tpm"),
    pytest.param({"name": "x", "role": "client", "agents": "demo"}, "agents", id="agents-not-a-list"),
    pytest.param({"name": "x", "role": "client", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at",
                 id="expired"),
])
def test_it_validates_a_new_key_strictly(admin_key, make_agent, body, param):
    make_agent(name="demo")
    count = ApiKey.objects.count()

    response = post(admin_key, KEYS, body)

    error = assert_error(response, 400, param=param)
    assert param in error["message"]
    assert ApiKey.objects.count() == count


@pytest.mark.django_db
def test_it_refuses_a_body_that_is_not_an_object(admin_key):
    response = api(admin_key).post(KEYS, [1, 2], format="json")

    assert_error(response, 400)


# --- list and detail ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_lists_keys_with_filters_and_pagination(admin_key, make_key):
    client = make_key("client")
    developer = make_key("developer")
    revoked = make_key("client")
    api_key_revoke(api_key=key_of(revoked))
    expired = make_key("client", expires_at=timezone.now() - timedelta(minutes=1))
    disabled = make_key("client")
    ApiKey.objects.filter(prefix=key_of(disabled).prefix).update(enabled=False)

    def prefixes(**params) -> set[str]:
        response = api(admin_key).get(KEYS, params)
        assert response.status_code == 200, response.content
        return {k["prefix"] for k in response.json()["results"]}

    p = {name: key_of(s).prefix for name, s in
         dict(admin=admin_key, client=client, developer=developer, revoked=revoked, expired=expired,
              disabled=disabled).items()}
    assert prefixes() == set(p.values())
    assert prefixes(role="developer") == {p["developer"]}
    assert prefixes(status="active") == {p["admin"], p["client"], p["developer"]}
    assert prefixes(status="revoked") == {p["revoked"]}
    assert prefixes(status="expired") == {p["expired"]}
    assert prefixes(status="disabled") == {p["disabled"]}
    assert prefixes(enabled="false") == {p["disabled"]}
    assert prefixes(role="client", status="active") == {p["client"]}

    page = api(admin_key).get(KEYS, {"limit": 2, "offset": 0}).json()
    assert page["count"] == 6 and len(page["results"]) == 2 and page["next"]
    statuses = {k["prefix"]: k["status"] for k in api(admin_key).get(KEYS).json()["results"]}
    assert statuses[p["revoked"]] == "revoked" and statuses[p["expired"]] == "expired"

    assert_error(api(admin_key).get(KEYS, {"status": "sleeping"}), 400, param="status")
    assert_error(api(admin_key).get(KEYS, {"role": "owner"}), 400, param="role")


@pytest.mark.django_db
def test_it_shows_one_key_and_404s_an_unknown_prefix(admin_key, target):
    prefix = key_of(target).prefix

    body = api(admin_key).get(f"{KEYS}/{prefix}").json()

    assert body["prefix"] == prefix and body["role"] == "client" and body["status"] == "active"
    assert "key" not in body
    assert_error(api(admin_key).get(f"{KEYS}/000000000000"), 404, "api_key_not_found")
    assert_error(post(admin_key, f"{KEYS}/000000000000/rotate"), 404, "api_key_not_found")
    assert_error(post(admin_key, f"{KEYS}/000000000000/revoke"), 404, "api_key_not_found")


# --- update ----------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_updates_a_key_and_every_worker_sees_it(admin_key, target, make_agent):
    make_agent(name="demo", skills=["calculator"])
    make_agent(name="other")
    prefix = key_of(target).prefix
    assert authenticates(target)  # cached now

    response = patch(admin_key, f"{KEYS}/{prefix}", {
        "name": "renamed", "role": "developer", "agents": ["demo"], "allowed_skills": ["calculator"],
        "rate_limit_rpm": 10, "rate_limit_tpm": None, "enabled": False})

    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["name"], body["role"], body["agents"], body["allowed_skills"], body["rate_limit_rpm"],
            body["enabled"], body["status"]) == ("renamed", "developer", ["demo"], ["calculator"], 10, False,
                                                 "disabled")
    assert not authenticates(target)  # the cached entry was dropped on save

    patch(admin_key, f"{KEYS}/{prefix}", {"enabled": True})
    agents = api(target).get("/api/v1/agents").json()["results"]
    assert [a["name"] for a in agents] == ["demo"]

    patch(admin_key, f"{KEYS}/{prefix}", {"agents": []})  # a list restricts, an empty one to nothing
    assert api(target).get("/api/v1/agents").json()["results"] == []

    body = patch(admin_key, f"{KEYS}/{prefix}", {"all_agents": True}).json()  # all agents again
    assert (body["all_agents"], body["agents"]) == (True, [])
    agents = api(target).get("/api/v1/agents").json()["results"]
    assert sorted(a["name"] for a in agents) == ["demo", "other"]

    patch(admin_key, f"{KEYS}/{prefix}", {"expires_at": (timezone.now() - timedelta(seconds=1)).isoformat()})
    assert not authenticates(target)


@pytest.mark.django_db
@pytest.mark.parametrize("body, param", [
    pytest.param({"secret_hash": "0" * 64}, "secret_hash", id="hash"),
    pytest.param({"revoked_at": None}, "revoked_at", id="revoked_at"),
    pytest.param({"prefix": "mine"}, "prefix", id="prefix"),
    pytest.param({"nmae": "typo"}, "nmae", id="typo"),
    pytest.param({"agents": ["nope"]}, "agents", id="unknown-agent"),
    pytest.param({"role": "root"}, "role", id="bad-role"),
    pytest.param({"enabled": "maybe"}, "enabled", id="bad-bool"),
])
def test_it_validates_updates_strictly(admin_key, target, body, param):
    before = every_stored_value(key_of(target))

    response = patch(admin_key, f"{KEYS}/{key_of(target).prefix}", body)

    assert_error(response, 400, param=param)
    assert every_stored_value(key_of(target)) == before


# --- rotation ---------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_rotates_with_a_grace_period(admin_key, target):
    prefix = key_of(target).prefix
    assert authenticates(target)

    response = post(admin_key, f"{KEYS}/{prefix}/rotate", {"grace_seconds": 3600})

    assert response.status_code == 200, response.content
    body = response.json()
    new = body["key"]
    assert body["prefix"] == prefix and new.startswith(f"ap_{prefix}_") and new != target
    stored = key_of(new)
    assert stored.secret_hash == hashlib.sha256(new.encode()).hexdigest()
    assert stored.previous_secret_hash == hashlib.sha256(target.encode()).hexdigest()
    expected = timezone.now() + timedelta(seconds=3600)
    assert abs((stored.previous_secret_expires_at - expected).total_seconds()) < 5
    assert body["previous_secret_expires_at"] is not None and body["rotated_at"] is not None
    assert new not in every_stored_value(stored)
    # Both work during the grace period; the new one is never listed again.
    assert authenticates(new) and authenticates(target)
    assert new not in api(admin_key).get(f"{KEYS}/{prefix}").content.decode()
    assert new not in api(admin_key).get(KEYS).content.decode()

    # Just before the end of the grace period the old secret still works ...
    stored.previous_secret_expires_at = timezone.now() + timedelta(seconds=2)
    stored.save(update_fields=["previous_secret_expires_at"])
    assert authenticates(target)
    # ... and from its end on it does not; the new one carries on.
    stored.previous_secret_expires_at = timezone.now() - timedelta(milliseconds=1)
    stored.save(update_fields=["previous_secret_expires_at"])
    assert not authenticates(target)
    assert authenticates(new)


@pytest.mark.django_db
def test_it_stops_the_old_secret_at_once_with_no_grace(admin_key, target):
    prefix = key_of(target).prefix
    assert authenticates(target)

    body = post(admin_key, f"{KEYS}/{prefix}/rotate", {"grace_seconds": 0}).json()

    assert body["previous_secret_expires_at"] is None
    assert key_of(target).previous_secret_hash == ""
    assert not authenticates(target)
    assert authenticates(body["key"])


@pytest.mark.django_db
def test_it_uses_the_configured_default_grace(admin_key, target, settings):
    settings.API_KEY_ROTATION_GRACE_SECONDS = 120

    body = post(admin_key, f"{KEYS}/{key_of(target).prefix}/rotate").json()

    stored = key_of(target)
    assert abs((stored.previous_secret_expires_at - timezone.now()).total_seconds() - 120) < 5
    assert authenticates(target) and authenticates(body["key"])


@pytest.mark.django_db
def test_it_keeps_one_previous_secret_when_rotated_twice_within_the_grace(admin_key, target):
    prefix = key_of(target).prefix
    second = post(admin_key, f"{KEYS}/{prefix}/rotate", {"grace_seconds": 3600}).json()["key"]

    third = post(admin_key, f"{KEYS}/{prefix}/rotate", {"grace_seconds": 3600}).json()["key"]

    assert not authenticates(target)  # the first secret stopped with the second rotation
    assert authenticates(second)
    assert authenticates(third)


@pytest.mark.django_db
@pytest.mark.parametrize("body, param", [
    pytest.param({"grace_seconds": -1}, "grace_seconds", id="negative"),
    pytest.param({"grace_seconds": 10**9}, "grace_seconds", id="too-long"),
    pytest.param({"grace_seconds": "soon"}, "grace_seconds", id="text"),
    pytest.param({"grace": 60}, "grace", id="unknown-field"),
])
def test_it_validates_a_rotation(admin_key, target, body, param):
    response = post(admin_key, f"{KEYS}/{key_of(target).prefix}/rotate", body)

    assert_error(response, 400, param=param)
    assert key_of(target).rotated_at is None
    assert authenticates(target)


@pytest.mark.django_db
def test_it_refuses_to_rotate_a_revoked_key(admin_key, target):
    api_key_revoke(api_key=key_of(target))

    assert_error(post(admin_key, f"{KEYS}/{key_of(target).prefix}/rotate"), 409, "api_key_revoked")


# --- revocation ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_revokes_every_secret_of_a_key(admin_key, target):
    prefix = key_of(target).prefix
    new = post(admin_key, f"{KEYS}/{prefix}/rotate", {"grace_seconds": 3600}).json()["key"]
    assert authenticates(target) and authenticates(new)

    response = post(admin_key, f"{KEYS}/{prefix}/revoke")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "revoked" and body["revoked_at"] and "key" not in body
    assert not authenticates(target)
    assert not authenticates(new)
    stored = key_of(new)
    assert stored.previous_secret_hash == "" and stored.previous_secret_expires_at is None

    again = post(admin_key, f"{KEYS}/{prefix}/revoke")
    assert again.status_code == 200 and again.json()["revoked_at"] == body["revoked_at"]
    assert_error(post(admin_key, f"{KEYS}/{prefix}/revoke", {"reason": "x"}), 400, param="reason")


@pytest.mark.django_db
def test_it_never_audits_a_secret_or_a_hash(admin_key, make_agent):
    """Whatever the audit log stores for key changes names the key by prefix, never by secret."""
    created = post(admin_key, KEYS, {"name": "audited", "role": "client"}).json()
    prefix = created["prefix"]
    rotated = post(admin_key, f"{KEYS}/{prefix}/rotate", {"grace_seconds": 60}).json()
    patch(admin_key, f"{KEYS}/{prefix}", {"name": "audited again"})
    post(admin_key, f"{KEYS}/{prefix}/revoke")

    stored = ApiKey.objects.get(prefix=prefix)
    forbidden = [created["key"], rotated["key"], stored.secret_hash,
                 hashlib.sha256(created["key"].encode()).hexdigest(), created["key"].split("_", 2)[2]]
    rows = list(AuditLog.objects.filter(target=f"api_key:{prefix}").order_by("id"))
    assert [row.action for row in rows] == ["api_key.created", "api_key.rotated", "api_key.updated",
                                            "api_key.revoked"]
    for row in rows:
        text = json.dumps(row.details)
        assert not any(value in text for value in forbidden), row.details
        assert row.actor == f"key:{key_of(admin_key).prefix}"
        assert row.request_id and row.outcome == "success"
    assert rows[1].details["grace_seconds"] == 60
    assert rows[2].details["changed"] == {"name": {"from": "audited", "to": "audited again"}}


@pytest.mark.django_db
def test_it_audits_console_changes_as_the_staff_user(admin_client, admin_user, target):
    key = key_of(target)
    url = reverse("admin:governance_apikey_changelist")
    admin_client.post(url, {"action": "rotate_selected", "_selected_action": [key.pk]})
    admin_client.post(url, {"action": "revoke_selected", "_selected_action": [key.pk]})

    rows = AuditLog.objects.filter(target=f"api_key:{key.prefix}").order_by("id")
    assert [(r.actor, r.action) for r in rows][-2:] == [(f"user:{admin_user.username}", "api_key.rotated"),
                                                       (f"user:{admin_user.username}", "api_key.revoked")]


# --- roles on the other endpoints -----------------------------------------------------------------


@pytest.mark.django_db
def test_it_shows_each_key_only_its_own_sessions_and_an_admin_all(make_key, make_agent):
    agent = make_agent(name="demo")
    keys = {role: make_key(role) for role in ("client", "developer", "admin")}
    sessions = {role: Session.objects.create(agent=agent, api_key=key_of(secret), title=role)
                for role, secret in keys.items()}

    def listed(secret: str) -> set[str]:
        return {s["title"] for s in api(secret).get("/api/v1/sessions").json()["results"]}

    assert listed(keys["client"]) == {"client"}
    assert listed(keys["developer"]) == {"developer"}
    assert listed(keys["admin"]) == {"client", "developer", "admin"}
    for role in ("client", "developer"):
        other = sessions["admin"].pk
        assert_error(api(keys[role]).get(f"/api/v1/sessions/{other}"), 404, "session_not_found")
        assert api(keys[role]).get(f"/api/v1/sessions/{sessions[role].pk}").status_code == 200
    assert api(keys["admin"]).get(f"/api/v1/sessions/{sessions['client'].pk}").status_code == 200


@pytest.mark.django_db
def test_it_shows_a_client_only_its_allowed_agents(make_key, make_agent):
    make_agent(name="demo")
    make_agent(name="secret-agent")
    client = make_key("client", agents=["demo"])

    assert [a["name"] for a in api(client).get("/api/v1/agents").json()["results"]] == ["demo"]
    assert_error(api(client).get("/api/v1/agents/secret-agent"), 404, "agent_not_found")


# --- the console ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_rotates_selected_keys_in_the_console_and_shows_each_secret_once(admin_client, make_key, settings):
    settings.API_KEY_ROTATION_GRACE_SECONDS = 600
    old = [make_key("client"), make_key("developer")]
    revoked = make_key("client")
    api_key_revoke(api_key=key_of(revoked))
    url = reverse("admin:governance_apikey_changelist")

    response = admin_client.post(url, {"action": "rotate_selected",
                                       "_selected_action": [key_of(s).pk for s in [*old, revoked]]}, follow=True)

    assert response.status_code == 200
    shown = [str(m) for m in response.context["messages"]]
    new = [s for m in shown for s in SECRET_RE.findall(m)]
    assert len(new) == 2 and not set(new) & set(old)
    page = response.content.decode()
    for secret in new:
        assert page.count(secret) == 1
        assert authenticates(secret)
        assert key_of(secret).secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert any("Rotated 2 keys. Skipped 1 revoked key." in m for m in shown)
    assert all("keeps working until" in m for m in shown if SECRET_RE.search(m))
    for secret in old:
        assert authenticates(secret)  # grace period
        assert key_of(secret).previous_secret_expires_at > timezone.now() + timedelta(seconds=590)
    assert key_of(revoked).rotated_at is None

    again = admin_client.get(url).content.decode()
    assert not any(secret in again for secret in new)
    for secret in new:
        detail = admin_client.get(reverse("admin:governance_apikey_change", args=[key_of(secret).pk]))
        assert secret not in detail.content.decode()
        assert key_of(secret).previous_secret_hash not in detail.content.decode()


@pytest.mark.django_db
def test_it_revokes_in_the_console(admin_client, target):
    url = reverse("admin:governance_apikey_changelist")

    response = admin_client.post(url, {"action": "revoke_selected", "_selected_action": [key_of(target).pk]},
                                 follow=True)

    assert "Revoked 1 key." in [str(m) for m in response.context["messages"]]
    assert not authenticates(target)


@pytest.mark.django_db
def test_it_edits_limits_and_skills_in_the_console(admin_client, target, make_agent):
    make_agent(name="demo", skills=["calculator"])
    key = key_of(target)
    url = reverse("admin:governance_apikey_change", args=[key.pk])
    form = {"name": key.name, "role": "client", "enabled": "on", "all_agents": "on", "agents": [],
            "allowed_skills": '["calculator"]', "rate_limit_rpm": "30", "rate_limit_tpm": ""}

    assert admin_client.post(url, form).status_code == 302

    key.refresh_from_db()
    assert (key.all_agents, key.all_skills, key.allowed_skills, key.rate_limit_rpm, key.rate_limit_tpm) == (
        True, False, ["calculator"], 30, None)
    bad = admin_client.post(url, {**form, "allowed_skills": '["nope"]', "rate_limit_rpm": "0"})
    assert bad.status_code == 200
    assert set(bad.context["adminform"].form.errors) == {"allowed_skills", "rate_limit_rpm"}


# --- manage.py rotate_api_keys --------------------------------------------------------------------


def run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("rotate_api_keys", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def age(secret: str, days: int) -> None:
    ApiKey.objects.filter(prefix=key_of(secret).prefix).update(created_at=timezone.now() - timedelta(days=days))


@pytest.fixture
def aged(make_key) -> dict[str, str]:
    """Keys made 200 and 100 days ago, one made today, and an old revoked one."""
    keys = {"oldest": make_key("client"), "old": make_key("developer"), "new": make_key("client"),
            "revoked": make_key("client")}
    age(keys["oldest"], 200)
    age(keys["old"], 100)
    age(keys["revoked"], 300)
    api_key_revoke(api_key=key_of(keys["revoked"]))
    return keys


@pytest.mark.django_db
def test_it_lists_what_a_dry_run_would_rotate_and_changes_nothing(aged):
    before = {name: every_stored_value(key_of(s)) for name, s in aged.items()}

    out, _ = run("--older-than", "90d", "--dry-run")

    assert "Would rotate 2 keys" in out
    assert f"prefix {key_of(aged['oldest']).prefix}" in out and "age 200d" in out
    assert f"prefix {key_of(aged['old']).prefix}" in out and "age 100d" in out
    assert key_of(aged["new"]).prefix not in out and key_of(aged["revoked"]).prefix not in out
    assert "nothing was changed" in out
    assert not SECRET_RE.search(out)
    assert {name: every_stored_value(key_of(s)) for name, s in aged.items()} == before


@pytest.mark.django_db
def test_it_rotates_old_keys_and_prints_the_secrets_once(aged):
    out, _ = run("--older-than", "150d", "--grace", "1h")

    secrets_shown = SECRET_RE.findall(out)
    assert len(secrets_shown) == 1
    new = secrets_shown[0]
    assert key_of(new).prefix == key_of(aged["oldest"]).prefix
    assert out.count(new) == 1
    assert "[1/1]" in out and "rotated" in out
    assert authenticates(new) and authenticates(aged["oldest"])
    stored = key_of(new)
    assert abs((stored.previous_secret_expires_at - timezone.now()).total_seconds() - 3600) < 5
    assert key_of(aged["old"]).rotated_at is None
    # Rotated today: no longer older than 150 days.
    assert "No keys to rotate." in run("--older-than", "150d")[0]


@pytest.mark.django_db
def test_it_rotates_named_keys_as_json(aged):
    prefix = key_of(aged["new"]).prefix

    out, err = run("--key", prefix, "--grace", "0s", "--json")

    body = json.loads(out)
    assert body["dry_run"] is False and body["grace_seconds"] == 0
    [row] = body["keys"]
    assert (row["prefix"], row["role"], row["previous_secret_expires_at"]) == (prefix, "client", None)
    assert row["age_seconds"] >= 0
    assert authenticates(row["key"]) and not authenticates(aged["new"])
    assert f"prefix {prefix}" in err  # progress on stderr, stdout stays JSON
    assert row["key"] not in err


@pytest.mark.django_db
def test_it_writes_the_secrets_to_a_new_private_file(aged, tmp_path):
    path = tmp_path / "secrets.json"

    out, err = run("--older-than", "90d", "--json", "--output", str(path))

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    written = json.loads(path.read_text())
    assert {r["prefix"] for r in written["keys"]} == {key_of(aged["oldest"]).prefix, key_of(aged["old"]).prefix}
    for row in written["keys"]:
        assert authenticates(row["key"])
        assert row["key"] not in out and row["key"] not in err
    summary = json.loads(out)
    assert summary["output"] == str(path) and all("key" not in r for r in summary["keys"])


@pytest.mark.django_db
def test_it_writes_plain_secrets_to_a_file_and_never_overwrites_one(aged, tmp_path):
    path = tmp_path / "secrets.tsv"
    out, _ = run("--key", key_of(aged["new"]).prefix, "--output", str(path))
    lines = path.read_text().splitlines()
    assert lines[0] == "# prefix\tname\tkey"
    prefix, name, new = lines[1].split("\t")
    assert prefix == key_of(aged["new"]).prefix and authenticates(new)
    assert new not in out and "mode 0600" in out

    rotated_at = key_of(aged["old"]).rotated_at
    with pytest.raises(CommandError, match="never overwritten"):
        run("--key", key_of(aged["old"]).prefix, "--output", str(path))
    assert key_of(aged["old"]).rotated_at == rotated_at
    assert path.read_text().splitlines()[1].split("\t")[2] == new


@pytest.mark.django_db
@pytest.mark.parametrize("args, message", [
    pytest.param([], "--older-than DURATION and/or --key", id="no-selection"),
    pytest.param(["--older-than", "90x"], "not a duration", id="bad-unit"),
    pytest.param(["--older-than", "ninety"], "not a duration", id="words"),
    pytest.param(["--older-than", "0d"], "longer than 0", id="zero-age"),
    pytest.param(["--key", "000000000000"], "No API key", id="unknown-key"),
    pytest.param(["--older-than", "1d", "--grace", "90d"], "at most", id="long-grace"),
])
def test_it_validates_its_arguments(aged, args, message):
    before = {name: every_stored_value(key_of(s)) for name, s in aged.items()}

    with pytest.raises(CommandError, match=message):
        run(*args)

    assert {name: every_stored_value(key_of(s)) for name, s in aged.items()} == before


@pytest.mark.django_db
def test_it_refuses_to_rotate_a_named_revoked_key(aged):
    with pytest.raises(CommandError, match="revoked"):
        run("--key", key_of(aged["revoked"]).prefix)


# --- last_used_at -----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_it_stamps_last_used_at_at_most_once_a_minute(make_agent, make_key):
    await orm(make_agent, name="demo")
    secret = await orm(make_key)
    client = Api(secret)
    assert (await orm(key_of, secret)).last_used_at is None

    assert (await client.post("/api/v1/agents/demo/chat", {"message": "one"})).status_code == 200
    first = (await orm(key_of, secret)).last_used_at
    assert first is not None
    for text in ("two", "three"):
        assert (await client.post("/api/v1/agents/demo/chat", {"message": text})).status_code == 200
    assert (await orm(key_of, secret)).last_used_at == first  # not one write per request

    # A minute later (every worker's claim on the minute has lapsed) the next use stamps again.
    forget_key_usage()
    await orm(cache.clear)
    assert (await client.post("/api/v1/agents/demo/chat", {"message": "four"})).status_code == 200
    assert (await orm(key_of, secret)).last_used_at > first


@pytest.mark.django_db
def test_it_stamps_last_used_at_for_the_admin_api(admin_key):
    assert key_of(admin_key).last_used_at is None

    api(admin_key).get(KEYS)
    first = key_of(admin_key).last_used_at
    api(admin_key).get(KEYS)

    assert first is not None and key_of(admin_key).last_used_at == first


@pytest.mark.django_db
def test_it_leaves_the_stamp_to_the_worker_that_claimed_the_minute(admin_key):
    """Another worker stamped this minute (its claim is in the shared cache): no second write here."""
    cache.add(f"key-used:{key_of(admin_key).prefix}", 1, 60)
    forget_key_usage()

    assert api(admin_key).get(KEYS).status_code == 200

    assert key_of(admin_key).last_used_at is None


# --- revocation seen by another worker process ---------------------------------------------------


SETUP = """
import io, json
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
keys = {}
for role in ("admin", "client"):
    out = io.StringIO()
    call_command("create_api_key", name=role, role=role, json=True, stdout=out)
    keys[role] = json.loads(out.getvalue().strip().splitlines()[-1])["key"]
print(json.dumps(keys))
"""


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory):
    """Two Daphne processes sharing one SQLite file and the Redis cache at REDIS_URL."""
    var_dir = tmp_path_factory.mktemp("keys-var")
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "CACHE_URL", "CELERY_BROKER_URL", "CELERY_TASK_ALWAYS_EAGER",
                        "TEST_DATABASE_NAME", "METRICS_TOKEN", "ALLOW_INSECURE_SECRET_KEY", "READ_DOT_ENV")}
    run_id = uuid.uuid4().hex[:8]
    env.update(DJANGO_SETTINGS_MODULE="agentplatform.settings", DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50),
               VAR_DIR=str(var_dir), LOG_LEVEL="WARNING", REDIS_URL=django_settings.REDIS_URL,
               CACHE_KEY_PREFIX=f"keys-{run_id}", CHANNEL_LAYER_PREFIX=f"keys-{run_id}")
    setup = subprocess.run([sys.executable, "-c", SETUP], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert setup.returncode == 0, setup.stderr
    keys = json.loads(setup.stdout.strip().splitlines()[-1])

    processes, urls = [], []
    try:
        for name in ("a", "b"):
            log_path = var_dir / f"daphne-{name}.log"
            process, url = spawn_daphne(env, log_path)
            processes.append((process, log_path))
            urls.append(url)
        deadline = time.monotonic() + 30
        for (process, log_path), url in zip(processes, urls):
            wait_ready(process, url, log_path, deadline)
        yield {"a": urls[0], "b": urls[1], **keys}
    finally:
        stop_processes([process for process, _ in processes])


def _status(url: str, key: str) -> int:
    return httpx.get(f"{url}/api/v1/agents", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code


def _within(seconds: float, predicate) -> float:
    """Seconds until predicate() held; fails after `seconds`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < seconds, "not seen in time"
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.skipif(not django_settings.REDIS_URL,
                    reason="needs REDIS_URL: two server processes share revocations through Redis (the "
                           "local-memory cache is per process); the PostgreSQL+Redis CI lane runs it")
def test_it_revokes_and_rotates_on_every_worker(two_servers):
    a, b, admin, client = two_servers["a"], two_servers["b"], two_servers["admin"], two_servers["client"]
    prefix = client.split("_")[1]
    # Both workers have authenticated the key (its entry is cached).
    assert _status(a, client) == 200 and _status(b, client) == 200

    rotated = httpx.post(f"{a}/api/v1/admin/api-keys/{prefix}/rotate", json={"grace_seconds": 0},
                         headers={"Authorization": f"Bearer {admin}"}, timeout=10)
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["key"]
    assert _within(5, lambda: _status(b, client) == 401) < 5
    assert _status(b, new) == 200

    revoked = httpx.post(f"{a}/api/v1/admin/api-keys/{prefix}/revoke",
                         headers={"Authorization": f"Bearer {admin}"}, timeout=10)
    assert revoked.status_code == 200, revoked.text
    assert _within(5, lambda: _status(b, new) == 401) < 5
    assert _status(a, new) == 401
