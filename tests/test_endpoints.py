"""Every endpoint answers odd requests in the JSON error shape, never a 500 or Django's HTML:
OPTIONS and unknown methods on every route, CORS for browser apps, strict JSON bodies, integers
within their columns, unknown fields, date ranges, and the site root for people. Requests go
through the real ASGI application."""

from __future__ import annotations

import uuid

import pytest
from django.db import DatabaseError

from agents.models import Session
from billing.models import Budget, ModelPrice
from conftest import Api, assert_error, orm
from governance.models import ApiKey

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/api/v1/agents/demo/chat"
COMPLETIONS = "/v1/chat/completions"
# (path, the methods it answers) for every kind of view: async (chat), DRF, function views
# (health, metrics, the site root), Django pages of ours (console, dashboard), the schema.
ROUTES = [
    (CHAT, "POST, OPTIONS"),
    (COMPLETIONS, "POST, OPTIONS"),
    ("/api/v1/agents", "GET, HEAD, POST, OPTIONS"),
    ("/api/v1/agents/demo", "GET, HEAD, PATCH, DELETE, OPTIONS"),
    ("/api/v1/sessions", "GET, HEAD, POST, OPTIONS"),
    ("/api/v1/admin/api-keys", "GET, HEAD, POST, OPTIONS"),
    ("/api/v1/admin/budgets/1", "GET, HEAD, PATCH, DELETE, OPTIONS"),
    ("/api/v1/usage", "GET, HEAD, OPTIONS"),
    ("/v1/models", "GET, HEAD, OPTIONS"),
    ("/health", "GET, HEAD, OPTIONS"),
    ("/health/ready", "GET, HEAD, OPTIONS"),
    ("/metrics", "GET, HEAD, OPTIONS"),
    ("/api/schema/", "GET, HEAD, OPTIONS"),
    ("/", "GET, HEAD, OPTIONS"),
    ("/console/", "GET, HEAD, OPTIONS"),
    ("/admin/billing/dashboard/", "GET, HEAD, OPTIONS"),
]


@pytest.fixture
def demo(make_agent):
    return make_agent(name="demo")


@pytest.fixture
async def admin(make_key) -> str:
    return await orm(make_key, role="admin")


# --- methods ------------------------------------------------------------------------------


@pytest.mark.parametrize("path,allow", ROUTES)
async def test_it_answers_options_on_every_route_with_allow_and_no_key(demo, path, allow):
    response = await Api().request("OPTIONS", path)

    assert response.status_code == 204, (response.status_code, response.text[:300])
    assert response.headers["Allow"] == allow
    assert response.content == b""


@pytest.mark.parametrize("method", ["FOO", "TRACE", "PROPFIND", "PUT"])
@pytest.mark.parametrize("path,allow", ROUTES)
async def test_it_refuses_methods_a_route_does_not_answer_with_json_405(demo, admin, path, allow, method):
    response = await Api(admin).request(method, path)

    error = assert_error(response, 405, "method_not_allowed")
    assert method in error["message"]
    assert response.headers["Allow"] == allow


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "TRACE"])
@pytest.mark.parametrize("path", ["/health", "/health/ready", "/metrics"])
async def test_health_and_metrics_refuse_writes_with_json_not_a_csrf_page(path, method):
    response = await Api().request(method, path, content=b"{}", headers={"Content-Type": "application/json"})

    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "GET, HEAD, OPTIONS"


async def test_the_allowed_methods_still_work(demo, admin):
    assert (await Api().get("/health")).json() == {"status": "ok"}
    assert (await Api().request("HEAD", "/health")).status_code == 200
    assert (await Api(admin).get("/api/v1/agents")).status_code == 200
    assert (await Api(admin).post(CHAT, {"message": "hi"})).status_code == 200


# --- CORS ---------------------------------------------------------------------------------

APP = "https://app.example.com"


@pytest.fixture
def cors(settings):
    settings.CORS_ALLOWED_ORIGINS = [APP]
    return settings


async def test_a_preflight_from_an_allowed_origin_is_answered_without_a_key(demo, cors):
    response = await Api().request("OPTIONS", COMPLETIONS, headers={
        "Origin": APP, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key, x-request-id"})

    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == APP
    allowed = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key", "x-request-id"} <= allowed
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in response.headers  # keys, never cookies


async def test_a_request_from_an_allowed_origin_may_read_the_answer_and_its_headers(demo, cors, make_key):
    key = await orm(make_key, rate_limit_rpm=100, rate_limit_tpm=100_000)
    body = {"model": "demo", "messages": [{"role": "user", "content": "hello"}]}

    response = await Api(key).post(COMPLETIONS, body, headers={"Origin": APP, "Idempotency-Key": "cors-1"})

    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == APP
    exposed = {h.strip().lower() for h in response.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"x-request-id", "retry-after", "idempotent-replayed"} <= exposed
    rate_headers = {h.lower() for h in response.headers if h.lower().startswith("x-ratelimit-")}
    assert len(rate_headers) == 6 and rate_headers <= exposed  # requests and tokens: all readable


async def test_an_origin_not_listed_gets_no_cors_headers(demo, cors, make_key):
    key = await orm(make_key)
    preflight = await Api().request("OPTIONS", COMPLETIONS, headers={
        "Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"})
    call = await Api(key).post(COMPLETIONS, {"model": "demo", "messages": [{"role": "user", "content": "x"}]},
                               headers={"Origin": "https://evil.example.com"})

    assert "Access-Control-Allow-Origin" not in preflight.headers
    assert call.status_code == 200 and "Access-Control-Allow-Origin" not in call.headers


async def test_no_origin_is_allowed_by_default(demo, settings):
    assert settings.CORS_ALLOWED_ORIGINS == []
    preflight = await Api().request("OPTIONS", COMPLETIONS, headers={
        "Origin": APP, "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in preflight.headers


# --- strict JSON bodies on DRF's parser ----------------------------------------------------


@pytest.mark.parametrize("raw", [
    pytest.param('{"agent": "demo", "metadata": {"a": NaN}}', id="nan"),
    pytest.param('{"agent": "demo", "metadata": {"a": -Infinity}}', id="infinity"),
    pytest.param('{"agent": "demo", "metadata": 1e999}', id="overflow-top"),
    pytest.param('{"agent": "demo", "metadata": {"a": 1e999}}', id="overflow"),
    pytest.param('{"agent": "demo", "title": "\\ud800"}', id="lone-surrogate"),
    pytest.param('{"agent": "demo", "metadata": {"note": "a\\u0000b"}}', id="nul"),
    pytest.param('{"agent": "demo", "metadata": ' + "[" * 100 + "]" * 100 + "}", id="deep"),
    pytest.param('{"agent": "demo", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}", id="very-deep"),
])
async def test_drf_bodies_refuse_what_json_cannot_store(demo, admin, raw):
    # Today's main: metadata 1e999 answered 409 session_exists (a JSON check's IntegrityError).
    assert_error(await Api(admin).post("/api/v1/sessions", raw=raw), 400, "invalid_json")
    assert await orm(Session.objects.count) == 0


async def test_a_session_id_taken_is_still_a_409(demo, admin):
    session_id = str(uuid.uuid4())
    assert (await Api(admin).post("/api/v1/sessions", {"agent": "demo", "id": session_id})).status_code == 201
    assert_error(await Api(admin).post("/api/v1/sessions", {"agent": "demo", "id": session_id}), 409,
                 "session_exists", param="id")


def test_session_create_says_exists_only_for_a_taken_id(make_agent):
    """Another constraint failing (here the JSON column refusing Infinity) is not "exists"."""
    from agentplatform.errors import Conflict
    from agents.services import session_create
    from governance.principal import Principal
    from governance.services import api_key_create

    agent = make_agent(name="demo")
    api_key, _ = api_key_create(name="k", role="admin")
    principal = Principal(key_id=api_key.id, prefix=api_key.prefix, name="k", role="admin", agents=None)
    with pytest.raises(DatabaseError) as info:
        session_create(agent_id=agent.id, principal=principal, metadata={"a": float("inf")})
    assert not isinstance(info.value, Conflict)


@pytest.mark.parametrize("path", ["/api/v1/agents?q=%00", "/api/v1/sessions?agent=a%00", "/api/v1/agents/a%00b",
                                  "/api/v1/flags?agent=%00", "/v1/models/%00", "/admin/billing/dashboard/?model=a%00",
                                  "/admin/agents/agent/?q=%00"])
async def test_a_nul_character_in_the_url_is_a_400(demo, admin, path):
    # PostgreSQL cannot compare text with NUL: psycopg refused the query, a 500 (found by schemathesis).
    assert_error(await Api(admin).get(path), 400, "invalid_url")


async def test_a_message_role_that_is_not_a_string_is_a_400(demo, admin):
    # Found by schemathesis: {"role": {}} was a TypeError (unhashable) 500.
    body = {"model": "demo", "messages": [{"role": {}, "content": "hi"}]}
    assert_error(await Api(admin).post(COMPLETIONS, body), 400, "invalid_field", param="messages[0].role")


async def test_the_prices_list_is_documented_as_it_answers(admin):
    # Found by schemathesis: the schema said a bare array, the answer is {"data": [...]}.
    schema = (await Api(admin).get("/api/schema/", params={"format": "json"})).json()
    response = schema["paths"]["/api/v1/admin/prices"]["get"]["responses"]["200"]["content"]["application/json"]
    ref = response["schema"]["$ref"].rsplit("/", 1)[-1]
    assert schema["components"]["schemas"][ref]["properties"]["data"]["type"] == "array"
    assert list((await Api(admin).get("/api/v1/admin/prices")).json()) == ["data"]


# --- integers within their columns, dates within range -------------------------------------

BIG = 2**63


@pytest.mark.parametrize("body,param", [
    ({"name": "k", "role": "client", "rate_limit_rpm": BIG}, "rate_limit_rpm"),
    ({"name": "k", "role": "client", "rate_limit_tpm": 2**31}, "rate_limit_tpm"),
])
async def test_key_limits_are_bounded_by_their_column(admin, body, param):
    assert_error(await Api(admin).post("/api/v1/admin/api-keys", body), 400, "invalid_field", param=param)
    assert await orm(ApiKey.objects.filter(name="k").count) == 0


async def test_key_limits_are_bounded_on_update_and_rotate(admin):
    created = await Api(admin).post("/api/v1/admin/api-keys", {"name": "k", "role": "client",
                                                                "rate_limit_rpm": 2**31 - 1})
    assert created.status_code == 201
    prefix = created.json()["prefix"]
    path = f"/api/v1/admin/api-keys/{prefix}"
    assert_error(await Api(admin).request("PATCH", path, json={"rate_limit_rpm": BIG}), 400, "invalid_field",
                 param="rate_limit_rpm")
    assert_error(await Api(admin).post(f"{path}/rotate", {"grace_seconds": BIG}), 400, "invalid_field",
                 param="grace_seconds")
    assert await orm(lambda: ApiKey.objects.get(prefix=prefix).rate_limit_rpm) == 2**31 - 1


@pytest.mark.parametrize("field,value", [
    ("temperature", 10**400), ("temperature", -(10**400)), ("max_tokens", BIG), ("timeout_seconds", BIG),
    ("max_tokens", -BIG),
])
async def test_agent_numbers_are_bounded(make_key, field, value):
    developer = await orm(make_key, role="developer")
    body = {"name": "bounded", "model": "local/demo", field: value}

    assert_error(await Api(developer).post("/api/v1/agents", body), 400, "invalid_agent", param=field)
    agent = await Api(developer).post("/api/v1/agents", {"name": "bounded", "model": "local/demo"})
    assert agent.status_code == 201
    assert_error(await Api(developer).request("PATCH", "/api/v1/agents/bounded", json={field: value}), 400,
                 "invalid_agent", param=field)


async def test_budget_thresholds_are_bounded(admin):
    body = {"scope": "global", "period": "day", "limit_usd": "1", "alert_thresholds": [BIG]}
    assert_error(await Api(admin).post("/api/v1/admin/budgets", body), 400, "invalid_field",
                 param="alert_thresholds[0]")


@pytest.mark.parametrize("params,param", [
    ({"to": "9999-12-31"}, "to"),
    ({"from": "9999-12-31"}, "from"),
    ({"from": "9999-12-31T23:59:59"}, "from"),
    ({"to": "9999-12-31T23:00:00-05:00"}, "to"),
    ({"from": "0001-01-01T00:00:00+05:00"}, "from"),
    ({"from": "1969-12-31"}, "from"),
    ({"to": "2025-02-30"}, "to"),
])
async def test_usage_dates_out_of_range_are_a_400(admin, params, param):
    assert_error(await Api(admin).get("/api/v1/usage", params=params), 400, "invalid_field", param=param)


async def test_usage_takes_the_widest_range_it_allows(admin):
    response = await Api(admin).get("/api/v1/usage", params={"from": "1970-01-01", "to": "2999-12-31"})
    assert response.status_code == 200
    assert response.json()["to"] == "3000-01-01T00:00:00+00:00"


# --- unknown fields ------------------------------------------------------------------------


async def test_budgets_refuse_unknown_fields_on_create_and_update(admin):
    body = {"scope": "global", "period": "day", "limit_usd": "1", "hardd": False}
    assert_error(await Api(admin).post("/api/v1/admin/budgets", body), 400, "invalid_field", param="hardd")
    assert await orm(Budget.objects.count) == 0

    created = await Api(admin).post("/api/v1/admin/budgets", {"scope": "global", "period": "day", "limit_usd": "1"})
    budget_id = created.json()["id"]
    assert_error(await Api(admin).request("PATCH", f"/api/v1/admin/budgets/{budget_id}", json={"hardd": False}),
                 400, "invalid_field", param="hardd")
    assert await orm(lambda: Budget.objects.get(pk=budget_id).hard) is True


async def test_prices_refuse_unknown_fields(admin):
    body = {"model": "x/y", "input_per_1m": "1", "output_per_1m": "2", "cached_input": "0.5"}
    assert_error(await Api(admin).post("/api/v1/admin/prices", body), 400, "invalid_field", param="cached_input")
    assert await orm(ModelPrice.objects.filter(model="x/y").count) == 0


async def test_sessions_refuse_unknown_fields(demo, admin):
    assert_error(await Api(admin).post("/api/v1/sessions", {"agent": "demo", "titel": "x"}), 400, "invalid_field",
                 param="titel")


# --- the site root and the icon --------------------------------------------------------------


async def test_the_site_root_is_a_page_linking_the_admin_console_docs_and_health():
    response = await Api().get("/")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    for href in ('href="/admin/"', 'href="/console/"', 'href="/api/docs/"', 'href="/health"'):
        assert href in response.text
    assert 'rel="icon"' in response.text


async def test_the_favicon_is_served_and_linked_from_the_admin():
    icon = await Api().get("/favicon.ico")
    assert icon.status_code == 200
    assert icon.headers["content-type"] == "image/svg+xml"
    assert icon.content.startswith(b"<svg")

    login = await Api().get("/admin/login/")
    assert login.status_code == 200
    assert 'rel="icon" href="/static/agentplatform/favicon.svg"' in login.text
    assert (await Api().get("/static/agentplatform/favicon.svg")).status_code == 200
