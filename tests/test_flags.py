"""Feature flags: evaluation (targets, deterministic rollout), the shared cache and its
invalidation, the `streaming` and `skill.<name>` flags on the chat path, GET /api/v1/flags and
the admin pages."""

from __future__ import annotations

import pytest
from django.urls import reverse

from agents.models import Agent
from conftest import Api, assert_error, orm, parse_sse
from governance.flags import FLAGS_CACHE_KEY, FlagSpec, all_flags, flag_enabled, rollout_bucket
from governance.models import AuditLog, FeatureFlag
from governance.services import split_key

CHAT = "/api/v1/agents/{}/chat"
COMPLETIONS = "/v1/chat/completions"
CALL = 'add [call:calculator {"expression": "2+2"}]'


def spec(name: str = "beta", *, enabled: bool = True, rollout: int = 100, prefixes=(), roles=(), agents=()) -> FlagSpec:
    return FlagSpec(name=name, enabled=enabled, rollout_percentage=rollout, target_key_prefixes=frozenset(prefixes),
                    target_roles=frozenset(roles), target_agents=frozenset(agents))


def on_for(flag, prefix: str | None = "ap_0001", role: str | None = "client", agent: str | None = None) -> bool:
    return flag_enabled(flag, key_prefix=prefix, role=role, agent_name=agent)


# --- evaluation --------------------------------------------------------------------------------


def test_it_is_off_when_disabled_even_for_targets():
    flag = spec(enabled=False, prefixes=["ap_0001"], roles=["client"], agents=["demo"])

    assert not on_for(flag, agent="demo")


def test_it_is_on_for_everyone_at_100_and_for_nobody_at_0():
    prefixes = [f"ap_{i:04x}" for i in range(200)]

    assert all(on_for(spec(rollout=100), p) for p in prefixes)
    assert not any(on_for(spec(rollout=0), p) for p in prefixes)


def test_it_decides_the_rollout_by_hashing_the_flag_name_and_the_key():
    import hashlib

    digest = hashlib.sha256(b"beta:ap_1234").hexdigest()
    assert rollout_bucket("beta", "ap_1234") == int(digest[:8], 16) % 100
    bucket = rollout_bucket("beta", "ap_1234")

    assert on_for(spec(rollout=bucket + 1), "ap_1234")
    assert not on_for(spec(rollout=bucket), "ap_1234")


def test_it_is_stable_per_key():
    prefixes = [f"ap_{i:04x}" for i in range(300)]
    first = [on_for(spec(rollout=50), p) for p in prefixes]

    assert [on_for(spec(rollout=50), p) for p in prefixes] == first
    # A model instance evaluates exactly as its cached form.
    model = FeatureFlag(name="beta", enabled=True, rollout_percentage=50)
    assert [on_for(model, p) for p in prefixes] == first


def test_it_keeps_a_key_in_when_the_rollout_grows():
    prefixes = [f"ap_{i:04x}" for i in range(1000)]
    at_30 = {p for p in prefixes if on_for(spec(rollout=30), p)}
    at_60 = {p for p in prefixes if on_for(spec(rollout=60), p)}

    assert at_30 < at_60


@pytest.mark.parametrize("rollout", [10, 30, 50, 75])
def test_it_rolls_out_to_roughly_the_given_share(rollout):
    prefixes = [f"ap_{i:08x}" for i in range(1000)]

    share = sum(on_for(spec(rollout=rollout), p) for p in prefixes) / len(prefixes)

    assert rollout - 5 <= share * 100 <= rollout + 5


def test_it_picks_different_keys_for_different_flags():
    prefixes = [f"ap_{i:04x}" for i in range(1000)]

    first = {p for p in prefixes if on_for(spec("one", rollout=30), p)}
    second = {p for p in prefixes if on_for(spec("two", rollout=30), p)}

    assert first != second


def test_it_turns_a_flag_on_for_its_targets_outside_the_rollout():
    by_prefix = spec(rollout=0, prefixes=["ap_0001"])
    by_role = spec(rollout=0, roles=["developer"])
    by_agent = spec(rollout=0, agents=["demo"])

    assert on_for(by_prefix, "ap_0001") and not on_for(by_prefix, "ap_0002")
    assert on_for(by_role, role="developer") and not on_for(by_role, role="client")
    assert on_for(by_agent, agent="demo") and not on_for(by_agent, agent="other")
    assert not on_for(by_agent, agent=None)


def test_it_applies_the_rollout_to_callers_not_targeted():
    flag = spec(rollout=100, roles=["admin"])

    assert on_for(flag, role="client")


# --- the cache -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_reads_every_flag_from_one_cache_entry(django_assert_num_queries):
    FeatureFlag.objects.create(name="beta", enabled=True, rollout_percentage=40, target_roles=["admin"])

    with django_assert_num_queries(1):
        first = all_flags()
    with django_assert_num_queries(0):
        again = all_flags()

    assert first == again
    assert again["beta"] == spec("beta", rollout=40, roles=["admin"])


@pytest.mark.django_db
def test_it_caches_the_absence_of_flags_too(django_assert_num_queries):
    assert all_flags() == {}
    with django_assert_num_queries(0):
        assert all_flags() == {}


@pytest.mark.django_db
def test_it_drops_the_cached_flags_on_save_and_delete():
    from django.core.cache import cache

    flag = FeatureFlag.objects.create(name="beta", enabled=True)
    assert all_flags()["beta"].enabled

    flag.enabled = False
    flag.save()
    assert cache.get(FLAGS_CACHE_KEY) is None
    assert not all_flags()["beta"].enabled

    flag.delete()
    assert "beta" not in all_flags()


# --- the chat path -------------------------------------------------------------------------------


# Requests through the ASGI app use the database from other threads: real transactions.
http = pytest.mark.django_db(transaction=True)


@pytest.fixture
def demo(make_agent) -> Agent:
    return make_agent(name="demo")


@http
async def test_it_refuses_a_stream_when_the_streaming_flag_is_off(demo, make_key):
    key = await orm(make_key)
    await orm(FeatureFlag.objects.create, name="streaming", enabled=False)

    response = await Api(key).post(CHAT.format("demo"), {"message": "hello", "stream": True})

    error = assert_error(response, 403, "streaming_disabled")
    assert "stream" in error["message"]
    plain = await Api(key).post(CHAT.format("demo"), {"message": "hello"})
    assert plain.status_code == 200
    assert plain.json()["output"] == "You said: hello"


@http
async def test_it_refuses_an_openai_stream_when_the_streaming_flag_is_off(demo, make_key):
    key = await orm(make_key)
    await orm(FeatureFlag.objects.create, name="streaming", enabled=False)
    body = {"model": "demo", "messages": [{"role": "user", "content": "hello"}]}

    assert_error(await Api(key).post(COMPLETIONS, {**body, "stream": True}), 403, "streaming_disabled")
    assert (await Api(key).post(COMPLETIONS, body)).status_code == 200


@http
async def test_it_streams_for_the_keys_the_streaming_flag_targets(demo, make_key):
    client = await orm(make_key)
    developer = await orm(make_key, role="developer")
    await orm(FeatureFlag.objects.create, name="streaming", enabled=True, rollout_percentage=0,
              target_roles=["developer"])

    refused = await Api(client).post(CHAT.format("demo"), {"message": "hello", "stream": True})
    allowed = await Api(developer).post(CHAT.format("demo"), {"message": "hello", "stream": True})

    assert_error(refused, 403, "streaming_disabled")
    assert allowed.status_code == 200
    assert [e["event"] for e in parse_sse(allowed.text) if "event" in e][-1] == "done"


@http
async def test_it_streams_when_there_is_no_streaming_flag(demo, make_key):
    key = await orm(make_key)

    response = await Api(key).post(CHAT.format("demo"), {"message": "hello", "stream": True})

    assert response.status_code == 200


@http
async def test_it_sees_a_changed_flag_on_the_next_request(demo, make_key):
    key = await orm(make_key)
    flag = await orm(FeatureFlag.objects.create, name="streaming", enabled=True)
    assert (await Api(key).post(CHAT.format("demo"), {"message": "hi", "stream": True})).status_code == 200

    flag.enabled = False
    await orm(flag.save)

    assert_error(await Api(key).post(CHAT.format("demo"), {"message": "hi", "stream": True}), 403,
                 "streaming_disabled")


@http
async def test_it_serves_flags_from_the_cache_until_a_flag_is_saved(demo, make_key):
    key = await orm(make_key)
    flag = await orm(FeatureFlag.objects.create, name="beta", enabled=True)
    assert (await Api(key).get("/api/v1/flags")).json()["flags"] == {"beta": True}

    # An update that bypasses signals is not seen: the flags come from the cache, not the database.
    await orm(lambda: FeatureFlag.objects.filter(pk=flag.pk).update(enabled=False))
    assert (await Api(key).get("/api/v1/flags")).json()["flags"] == {"beta": True}

    flag.enabled = False
    await orm(flag.save)
    assert (await Api(key).get("/api/v1/flags")).json()["flags"] == {"beta": False}


@http
async def test_it_does_not_offer_a_skill_whose_flag_is_off(make_agent, make_key, openai_settings, fake_upstream):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", skills=["calculator"])
    key = await orm(make_key)
    await orm(FeatureFlag.objects.create, name="skill.calculator", enabled=False)

    response = await Api(key).post(CHAT.format("gpt"), {"message": CALL})

    assert response.status_code == 200
    body = response.json()
    # The fake upstream answers a call to a tool it was not offered with this text.
    assert body["output"] == "Tool calculator is not offered (offered: none)."
    assert body["tool_calls"] == []
    assert fake_upstream.stats()["requests"] == 1


@http
async def test_it_offers_a_skill_whose_flag_is_on(make_agent, make_key, openai_settings, fake_upstream):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", skills=["calculator"])
    key = await orm(make_key)
    await orm(FeatureFlag.objects.create, name="skill.calculator", enabled=True)

    body = (await Api(key).post(CHAT.format("gpt"), {"message": CALL})).json()

    assert body["output"] == "Tool result: 4"
    assert [c["name"] for c in body["tool_calls"]] == ["calculator"]


@http
async def test_it_switches_a_skill_per_agent(make_agent, make_key, openai_settings, fake_upstream):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", skills=["calculator"])
    await orm(make_agent, name="maths", model="openai/gpt-4o-mini", skills=["calculator"])
    key = await orm(make_key)
    await orm(FeatureFlag.objects.create, name="skill.calculator", enabled=True, rollout_percentage=0,
              target_agents=["maths"])

    gpt = (await Api(key).post(CHAT.format("gpt"), {"message": CALL})).json()
    maths = (await Api(key).post(CHAT.format("maths"), {"message": CALL})).json()

    assert gpt["output"] == "Tool calculator is not offered (offered: none)."
    assert maths["output"] == "Tool result: 4"


# --- GET /api/v1/flags ---------------------------------------------------------------------------


@http
async def test_it_lists_the_callers_evaluated_flags(demo, make_key):
    key = await orm(make_key)
    prefix = split_key(key)
    await orm(FeatureFlag.objects.bulk_create, [
        FeatureFlag(name="streaming", enabled=True),
        FeatureFlag(name="off", enabled=False),
        FeatureFlag(name="mine", enabled=True, rollout_percentage=0, target_key_prefixes=[prefix]),
        FeatureFlag(name="devs", enabled=True, rollout_percentage=0, target_roles=["developer"]),
        FeatureFlag(name="skill.calculator", enabled=True, rollout_percentage=0, target_agents=["demo"]),
    ])

    response = await Api(key).get("/api/v1/flags")

    assert response.status_code == 200
    assert response.json() == {"flags": {"devs": False, "mine": True, "off": False, "skill.calculator": False,
                                         "streaming": True}}
    for_demo = (await Api(key).get("/api/v1/flags", params={"agent": "demo"})).json()["flags"]
    assert for_demo["skill.calculator"] is True


@http
async def test_it_lists_flags_for_agents_the_key_may_use_only(demo, make_agent, make_key):
    await orm(make_agent, name="secret")
    key = await orm(make_key, agents=["demo"])

    assert (await Api(key).get("/api/v1/flags", params={"agent": "demo"})).status_code == 200
    assert_error(await Api(key).get("/api/v1/flags", params={"agent": "secret"}), 404, "agent_not_found")
    assert_error(await Api(key).get("/api/v1/flags", params={"agent": "nope"}), 404, "agent_not_found")


@http
async def test_it_needs_a_key_to_list_flags(demo):
    assert_error(await Api().get("/api/v1/flags"), 401)
    assert_error(await Api("ap_nope_nope").get("/api/v1/flags"), 401)


# --- the admin -----------------------------------------------------------------------------------


def flag_form(**overrides) -> dict:
    form = {"name": "beta", "description": "The beta.", "enabled": "on", "rollout_percentage": "30",
            "target_key_prefixes": "", "target_roles": "", "target_agents": ""}
    form.update(overrides)
    return form


@pytest.mark.django_db
def test_it_renders_the_flag_pages(admin_client):
    flag = FeatureFlag.objects.create(name="beta", enabled=True, target_roles=["admin"], target_agents=["demo"])

    changelist = admin_client.get(reverse("admin:governance_featureflag_changelist"))
    assert changelist.status_code == 200
    assert b"roles: admin; agents: demo" in changelist.content
    assert admin_client.get(reverse("admin:governance_featureflag_add")).status_code == 200
    change = admin_client.get(reverse("admin:governance_featureflag_change", args=[flag.pk]))
    assert change.status_code == 200
    assert b'value="admin"' in change.content
    search = admin_client.get(reverse("admin:governance_featureflag_changelist"), {"q": "bet", "enabled__exact": "1"})
    assert search.context["cl"].result_count == 1


@pytest.mark.django_db
def test_it_adds_a_flag_with_comma_separated_or_json_targets(admin_client):
    response = admin_client.post(reverse("admin:governance_featureflag_add"), flag_form(
        target_key_prefixes="ap_0001, ap_0002,,", target_roles='["developer", "admin"]', target_agents="demo\nhelp"))

    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else response
    flag = FeatureFlag.objects.get(name="beta")
    assert flag.enabled and flag.rollout_percentage == 30
    assert flag.target_key_prefixes == ["ap_0001", "ap_0002"]
    assert flag.target_roles == ["developer", "admin"]
    assert flag.target_agents == ["demo", "help"]


@pytest.mark.parametrize("field,value", [
    ("rollout_percentage", "101"),
    ("rollout_percentage", "-1"),
    ("target_roles", "wizard"),
    ("target_agents", '["demo", 3]'),
    ("target_key_prefixes", "[not json"),
    ("name", "two words"),
])
@pytest.mark.django_db
def test_it_refuses_invalid_flags_in_the_admin(admin_client, field, value):
    response = admin_client.post(reverse("admin:governance_featureflag_add"), flag_form(**{field: value}))

    assert response.status_code == 200
    assert field in response.context["adminform"].form.errors
    assert not FeatureFlag.objects.exists()


@pytest.mark.django_db
def test_it_audits_flag_changes_made_in_the_admin(admin_client, admin_user):
    admin_client.post(reverse("admin:governance_featureflag_add"), flag_form())
    flag = FeatureFlag.objects.get(name="beta")
    admin_client.post(reverse("admin:governance_featureflag_change", args=[flag.pk]),
                      flag_form(rollout_percentage="60", target_roles="developer"))

    entries = list(AuditLog.objects.filter(target="flag:beta").order_by("id"))
    assert [e.action for e in entries] == ["config.featureflag.created", "config.featureflag.updated"]
    assert {e.actor for e in entries} == {f"user:{admin_user.get_username()}"}
    assert FeatureFlag.objects.get(pk=flag.pk).target_roles == ["developer"]


@pytest.mark.django_db
def test_it_drops_the_cached_flags_when_the_admin_saves_one(admin_client):
    flag = FeatureFlag.objects.create(name="beta", enabled=True)
    assert all_flags()["beta"].enabled

    admin_client.post(reverse("admin:governance_featureflag_change", args=[flag.pk]),
                      flag_form(enabled="", rollout_percentage="100"))

    assert not all_flags()["beta"].enabled
