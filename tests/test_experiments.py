"""Experiments: sticky weighted assignment, the variant applied and reported on every transport
and stored with the run, its usage and its audit entry, feedback, the admin REST API and its
validation, and the statistics against reference values (computed once with scipy, pinned)."""

from __future__ import annotations

import time
import uuid
from collections import Counter

import pytest
from channels.testing import WebsocketCommunicator
from django.core.cache import cache

from agents.models import Run
from billing.models import UsageRecord
from conftest import Api, assert_error, orm, parse_sse
from experiments import stats
from experiments.assignment import assign
from experiments.models import Experiment
from experiments.selectors import experiment_cache_key
from governance.models import AuditLog

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("eager_celery")]

EXPERIMENTS = "/api/v1/admin/experiments"
CHAT = "/api/v1/agents/{}/chat"


@pytest.fixture
def demo(make_agent):
    return make_agent(name="demo", system_prompt="Be brief.")


@pytest.fixture
async def admin(make_key) -> str:
    return await orm(make_key, role="admin")


def body(name: str = "prompt-test", agent: str = "demo", status: str = "running", **fields) -> dict:
    return {"name": name, "agent": agent, "status": status,
            "variants": fields.pop("variants", [{"name": "control", "weight": 50, "is_control": True},
                                                {"name": "terse", "weight": 50, "model": "local/terse",
                                                 "system_prompt": "One word only."}]), **fields}


async def create(admin: str, **fields):
    return await Api(admin).post(EXPERIMENTS, body(**fields))


def only_variant(name: str = "treated", model: str = "local/treated", **overrides) -> list[dict]:
    """Every request goes to `name` (the control keeps weight 0)."""
    return [{"name": "control", "weight": 0, "is_control": True},
            {"name": name, "weight": 100, "model": model, **overrides}]


# --- assignment -------------------------------------------------------------------------------


def test_the_split_matches_the_weights_within_2_percent_over_10000_callers():
    weights = [("control", 50), ("b", 30), ("c", 20)]

    counts = Counter(assign(7, f"session:{uuid.UUID(int=i)}", weights) for i in range(10_000))

    for name, weight in weights:
        assert abs(counts[name] / 10_000 * 100 - weight) <= 2, counts
    # Another experiment splits the same callers independently.
    other = Counter((assign(7, f"s{i}", weights), assign(8, f"s{i}", weights)) for i in range(10_000))
    assert abs(other[("control", "control")] / 10_000 - 0.25) <= 0.02


def test_assignment_is_sticky_and_a_ramp_only_moves_callers_to_the_candidate():
    units = [f"session:{i}" for i in range(2000)]
    at_5 = {u: assign(3, u, [("control", 95), ("canary", 5)]) for u in units}
    at_25 = {u: assign(3, u, [("control", 75), ("canary", 25)]) for u in units}

    assert at_5 == {u: assign(3, u, [("control", 95), ("canary", 5)]) for u in units}  # sticky
    assert all(at_25[u] == "canary" for u in units if at_5[u] == "canary")


async def test_a_conversation_keeps_its_variant(demo, admin, make_key):
    assert (await create(admin)).status_code == 201
    api = Api(await orm(make_key))
    first = (await api.post(CHAT.format("demo"), {"message": "hi"})).json()
    session = first["session_id"]

    variants = {(await api.post(CHAT.format("demo"), {"message": "again", "session_id": session})).json()["variant"]
                for _ in range(5)}

    assert variants == {first["variant"]}
    names = set()
    for _ in range(30):  # new conversations land on both variants
        names.add((await api.post(CHAT.format("demo"), {"message": "hi"})).json()["variant"])
    assert names == {"control", "terse"}


# --- the variant on every transport --------------------------------------------------------------


async def test_the_variant_is_applied_returned_and_stored_on_every_transport(demo, admin, make_key):
    await create(admin, variants=only_variant(system_prompt="Variant prompt.", temperature=0.1))
    key = await orm(make_key)
    api = Api(key)

    rest = await api.post(CHAT.format("demo"), {"message": "hi"})
    assert rest.status_code == 200, rest.text
    assert rest.json()["variant"] == "treated" and rest.json()["model"] == "local/treated"
    assert rest.headers["X-Agent-Variant"] == "treated"

    sse = await api.post(CHAT.format("demo"), {"message": "hi", "stream": True})
    events = [e["data"] for e in parse_sse(sse.text) if "event" in e]
    assert sse.headers["X-Agent-Variant"] == "treated"
    assert events[0]["type"] == "start" and events[0]["variant"] == "treated" and events[0]["model"] == "local/treated"
    assert events[-1]["type"] == "done" and events[-1]["variant"] == "treated"

    v1 = await api.post("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "hi"}]})
    assert v1.status_code == 200, v1.text
    assert v1.headers["X-Agent-Variant"] == "treated"
    v1_stream = await api.post("/v1/chat/completions", {"model": "demo", "stream": True,
                                                        "messages": [{"role": "user", "content": "hi"}]})
    assert v1_stream.headers["X-Agent-Variant"] == "treated"

    from agentplatform.asgi import application

    communicator = WebsocketCommunicator(application, "/ws/agents/demo/chat/",
                                         headers=[(b"host", b"testserver"), (b"authorization", f"Bearer {key}".encode())])
    assert (await communicator.connect(timeout=5))[0]
    assert (await communicator.receive_json_from(timeout=5))["type"] == "ready"
    await communicator.send_json_to({"type": "message", "content": "hi"})
    frames = []
    while not frames or frames[-1]["type"] not in ("done", "error"):
        frames.append(await communicator.receive_json_from(timeout=10))
    await communicator.disconnect()
    assert frames[0]["type"] == "start" and frames[0]["variant"] == "treated"
    assert frames[-1]["type"] == "done" and frames[-1]["variant"] == "treated"

    queued = (await api.post("/api/v1/agents/demo/runs", {"message": "hi"})).json()
    deadline = time.monotonic() + 20
    while (run := (await api.get(f"/api/v1/runs/{queued['id']}")).json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert run["status"] == "succeeded" and run["variant"] == "treated" and run["model"] == "local/treated"

    experiment = await orm(Experiment.objects.get)
    runs = await orm(lambda: list(Run.objects.values_list("transport", "variant", "experiment_id", "model")))
    assert sorted(t for t, *_ in runs) == ["openai", "openai", "rest", "sse", "task", "websocket"]
    assert {r[1:] for r in runs} == {("treated", experiment.id, "local/treated")}
    usage = await orm(lambda: set(UsageRecord.objects.values_list("variant", "model")))
    assert usage == {("treated", "local/treated")}
    served = await orm(lambda: list(AuditLog.objects.filter(action="request.served").values_list("details", flat=True)))
    assert len(served) == 6 and all(d["variant"] == "treated" and d["experiment_id"] == experiment.id for d in served)


async def test_the_variant_prompt_and_skills_replace_the_agents(make_agent, admin, make_key):
    await orm(make_agent, name="demo", system_prompt="Original.", skills=["calculator"])
    await create(admin, variants=only_variant(model="local/demo", system_prompt="Replaced.", skills=[]))
    api = Api(await orm(make_key))

    answer = (await api.post(CHAT.format("demo"), {"message": "What is 6*7?"})).json()

    assert answer["variant"] == "treated" and answer["tool_calls"] == []  # no calculator offered


async def test_callers_left_out_by_the_flag_get_the_agent_as_it_is(demo, admin, make_key):
    from governance.models import FeatureFlag

    from governance.services import split_key

    inside = await orm(make_key)
    outside = await orm(make_key)

    await orm(FeatureFlag.objects.create, name="exp-gate", enabled=True, rollout_percentage=0,
              target_key_prefixes=[split_key(inside)])
    await create(admin, variants=only_variant(), flag="exp-gate")

    assert (await Api(inside).post(CHAT.format("demo"), {"message": "hi"})).json()["variant"] == "treated"
    left_out = await Api(outside).post(CHAT.format("demo"), {"message": "hi"})
    assert left_out.json()["variant"] is None and "X-Agent-Variant" not in left_out.headers
    assert left_out.json()["model"] == "local/demo"


async def test_the_running_experiment_is_cached_per_agent_and_dropped_on_save(demo, admin, make_key):
    api = Api(await orm(make_key))
    await api.post(CHAT.format("demo"), {"message": "hi"})
    assert cache.get(experiment_cache_key("demo")) == {"none": True, "agent_id": demo.id}  # a miss is cached too

    created = (await create(admin, variants=only_variant())).json()
    assert cache.get(experiment_cache_key("demo")) is None
    assert (await api.post(CHAT.format("demo"), {"message": "hi"})).json()["variant"] == "treated"
    assert cache.get(experiment_cache_key("demo"))["id"] == created["id"]

    # Warm, the entry is all a turn reads: a change that bypasses the signals (a queryset update)
    # is not seen until the entry expires — no query per request.
    await orm(Experiment.objects.filter(pk=created["id"]).update, status="paused")
    assert (await api.post(CHAT.format("demo"), {"message": "hi"})).json()["variant"] == "treated"

    await Api(admin).request("PATCH", f"{EXPERIMENTS}/{created['id']}", json={"status": "running"})
    await Api(admin).request("PATCH", f"{EXPERIMENTS}/{created['id']}", json={"status": "paused"})
    assert (await api.post(CHAT.format("demo"), {"message": "hi"})).json()["variant"] is None


async def test_an_agent_taking_a_renamed_agents_name_is_not_in_its_experiment(demo, admin, make_agent, make_key):
    await create(admin, variants=only_variant())
    api = Api(await orm(make_key))
    assert (await api.post(CHAT.format("demo"), {"message": "hi"})).json()["variant"] == "treated"

    demo.name = "renamed"
    await orm(demo.save)
    await orm(make_agent, name="demo")

    assert (await api.post(CHAT.format("demo"), {"message": "hi"})).json()["variant"] is None
    assert (await api.post(CHAT.format("renamed"), {"message": "hi"})).json()["variant"] == "treated"


# --- feedback ------------------------------------------------------------------------------------


async def test_feedback_on_own_runs_admin_on_any_others_404(demo, admin, make_key):
    await create(admin, variants=only_variant())
    owner, other = await orm(make_key), await orm(make_key)
    run_id = (await Api(owner).post(CHAT.format("demo"), {"message": "hi"})).json()["id"]
    url = f"/api/v1/runs/{run_id}/feedback"

    ok = await Api(owner).post(url, {"rating": 1, "comment": "Great answer."})
    assert ok.status_code == 200, ok.text
    assert ok.json()["rating"] == 1 and ok.json()["comment"] == "Great answer." and ok.json()["variant"] == "treated"
    assert_error(await Api(other).post(url, {"rating": -1}), 404, "run_not_found")
    assert (await Api(admin).post(url, {"rating": -1})).json()["rating"] == -1
    for bad in ({"rating": 2}, {"rating": "1"}, {"rating": True}, {"rating": 1.0}, {}, {"rating": 1, "x": 1}):
        assert_error(await Api(owner).post(url, bad), 400)
    assert_error(await Api(owner).post(f"/api/v1/runs/{uuid.uuid4()}/feedback", {"rating": 1}), 404, "run_not_found")

    run = await orm(Run.objects.get, pk=run_id)
    assert (run.feedback, run.feedback_comment) == (-1, "Great answer.")
    entries = await orm(lambda: list(AuditLog.objects.filter(action="run.feedback").order_by("id")
                                      .values_list("actor", "details")))
    assert [d["value"] for _, d in entries] == [1, -1] and entries[0][1]["variant"] == "treated"


# --- the admin REST API --------------------------------------------------------------------------


async def test_it_creates_lists_reads_and_changes_experiments(demo, admin):
    created = await create(admin, status="draft", description="Shorter prompt.")
    assert created.status_code == 201, created.text
    data = created.json()
    assert data["status"] == "draft" and data["agent"] == "demo" and data["started_at"] is None
    assert [v["name"] for v in data["variants"]] == ["control", "terse"]
    assert data["variants"][1]["model"] == "local/terse" and data["variants"][1]["system_prompt"] == "One word only."

    api = Api(admin)
    listed = (await api.get(EXPERIMENTS, params={"agent": "demo"})).json()
    assert listed["count"] == 1 and listed["results"][0]["id"] == data["id"]
    assert (await api.get(f"{EXPERIMENTS}/{data['id']}")).json() == data

    for status in ("running", "paused", "running"):
        changed = await api.request("PATCH", f"{EXPERIMENTS}/{data['id']}", json={"status": status})
        assert changed.status_code == 200 and changed.json()["status"] == status
    assert_error(await api.request("PATCH", f"{EXPERIMENTS}/{data['id']}", json={"variants": body()["variants"]}),
                 400, param="variants")
    actions = await orm(lambda: list(AuditLog.objects.filter(target=f"experiment:{data['name']}").order_by("id")
                                     .values_list("action", "actor")))
    assert actions[0] == ("experiment.created", actions[0][1]) and len(actions) == 4
    assert all(actor.startswith("key:") for _, actor in actions)


@pytest.mark.parametrize("fields, code, param", [
    ({"variants": [{"name": "control", "weight": 60, "is_control": True}, {"name": "b", "weight": 30}]},
     "weights_not_100", "variants"),
    ({"variants": [{"name": "a", "weight": 50}, {"name": "b", "weight": 50}]}, "control_required", "variants"),
    ({"variants": [{"name": "control", "weight": 100, "is_control": True}]}, "invalid_field", "variants"),
    ({"variants": [{"name": "control", "weight": 50, "is_control": True, "model": "local/x"},
                   {"name": "b", "weight": 50}]}, "invalid_field", "variants[0].model"),
    ({"variants": [{"name": "control", "weight": 50, "is_control": True}, {"name": "control", "weight": 50}]},
     "invalid_field", "variants[1].name"),
    ({"variants": [{"name": "control", "weight": 50, "is_control": True}, {"name": "b", "weight": 150}]},
     "invalid_field", "variants[1].weight"),
    ({"variants": [{"name": "control", "weight": 50, "is_control": True}, {"name": "b", "weight": 50,
                                                                           "model": "gpt-4o"}]},
     "invalid_field", "variants[1].model"),
    ({"variants": [{"name": "control", "weight": 50, "is_control": True}, {"name": "b", "weight": 50,
                                                                           "skills": ["nope"]}]},
     "invalid_field", "variants[1].skills"),
    ({"variants": [{"name": "control", "weight": 50, "is_control": True}, {"name": "b", "weight": 50,
                                                                           "temprature": 1}]},
     "invalid_field", "variants[1].temprature"),
    ({"status": "paused"}, "invalid_field", "status"),
    ({"colour": "red"}, "invalid_field", "colour"),
    ({"name": "Bad Name"}, "invalid_field", "name"),
])
async def test_it_refuses_invalid_experiments_with_a_clear_400(demo, admin, fields, code, param):
    error = assert_error(await create(admin, **fields), 400, code, param=param)

    assert error["message"]
    assert await orm(Experiment.objects.count) == 0


async def test_a_second_running_experiment_on_an_agent_is_a_400(demo, admin):
    assert (await create(admin, name="first")).status_code == 201

    error = assert_error(await create(admin, name="second"), 400, "experiment_already_running", param="status")
    assert "first" in error["message"]
    draft = (await create(admin, name="third", status="draft")).json()
    assert_error(await Api(admin).request("PATCH", f"{EXPERIMENTS}/{draft['id']}", json={"status": "running"}),
                 400, "experiment_already_running", param="status")
    assert await orm(Experiment.objects.filter(status="running").count) == 1


async def test_the_admin_api_is_for_admin_keys_and_unknown_ids_are_404(demo, admin, make_key):
    developer = await orm(make_key, role="developer")
    assert_error(await Api(developer).get(EXPERIMENTS), 403)
    assert_error(await Api(developer).post(EXPERIMENTS, body()), 403)
    assert_error(await Api().get(EXPERIMENTS, key=""), 401)
    assert_error(await Api(admin).get(f"{EXPERIMENTS}/999"), 404, "experiment_not_found")
    assert_error(await Api(admin).get(f"{EXPERIMENTS}/999/results"), 404, "experiment_not_found")
    assert_error(await create(admin, agent="nobody"), 404, "agent_not_found", param="agent")
    made = (await create(admin)).json()
    assert_error(await Api(admin).request("PATCH", f"{EXPERIMENTS}/{made['id']}", json={"agent": "x"}), 400,
                 param="agent")
    assert_error(await Api(admin).request("PATCH", f"{EXPERIMENTS}/{made['id']}", json={"status": "draft"}), 400,
                 "invalid_transition", param="status")


async def test_replacing_the_variants_keeps_the_shadow_by_name(demo, admin):
    made = (await create(admin, status="draft", shadow_variant="terse", shadow_percent=10)).json()
    api = Api(admin)

    kept = await api.request("PATCH", f"{EXPERIMENTS}/{made['id']}", json={"variants": [
        {"name": "control", "weight": 70, "is_control": True}, {"name": "terse", "weight": 30, "model": "local/t2"}]})
    assert kept.status_code == 200, kept.text
    assert kept.json()["shadow_variant"] == "terse" and kept.json()["variants"][1]["model"] == "local/t2"
    gone = await api.request("PATCH", f"{EXPERIMENTS}/{made['id']}", json={"variants": [
        {"name": "control", "weight": 70, "is_control": True}, {"name": "other", "weight": 30, "model": "local/o"}]})
    assert gone.status_code == 200 and gone.json()["shadow_variant"] is None
    assert_error(await api.request("PATCH", f"{EXPERIMENTS}/{made['id']}", json={"shadow_variant": "control"}), 400,
                 param="shadow_variant")


async def test_promoting_a_winner_applies_its_overrides_and_finishes(demo, admin, make_key):
    made = (await create(admin)).json()

    promoted = await Api(admin).request("PATCH", f"{EXPERIMENTS}/{made['id']}", json={"promote": "terse"})

    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["status"] == "finished" and promoted.json()["promoted_variant"] == "terse"
    agent = await orm(type(demo).objects.get, pk=demo.pk)
    assert (agent.model, agent.system_prompt) == ("local/terse", "One word only.")
    answer = (await Api(await orm(make_key)).post(CHAT.format("demo"), {"message": "hi"})).json()
    assert answer["model"] == "local/terse" and answer["variant"] is None
    entry = await orm(AuditLog.objects.get, action="experiment.promoted")
    assert entry.details["variant"] == "terse" and entry.details["applied"]["model"] == "local/terse"
    assert await orm(AuditLog.objects.filter(action="config.agent.updated", actor=entry.actor).exists)


async def test_results_compare_each_variant_with_the_control(demo, admin, make_key):
    made = (await create(admin, min_sample=5)).json()
    api = Api(await orm(make_key))
    for _ in range(40):
        answer = (await api.post(CHAT.format("demo"), {"message": "hi"})).json()
        await api.post(f"/api/v1/runs/{answer['id']}/feedback", {"rating": 1 if answer["variant"] == "terse" else -1})

    results = (await Api(admin).get(f"{EXPERIMENTS}/{made['id']}/results")).json()

    by_name = {v["name"]: v for v in results["variants"]}
    assert sum(v["requests"] for v in results["variants"]) == 40
    assert by_name["terse"]["positive_rate"] == 1.0 and by_name["control"]["positive_rate"] == 0.0
    assert by_name["control"]["error_rate"] == 0.0 and by_name["terse"]["latency_p95_ms"] is not None
    assert by_name["terse"]["cost_per_request_usd"] is not None and by_name["terse"]["tokens_per_request"] > 0
    metrics = {c["metric"]: c for c in results["comparisons"]}
    assert set(metrics) == {"error_rate", "positive_feedback_rate", "latency_ms", "cost_usd"}
    assert all("p_value" in c and c["variant"] == "terse" and c["control"] == "control" for c in metrics.values())
    feedback = metrics["positive_feedback_rate"]
    assert feedback["p_value"] < 1e-6 and feedback["significant"] and feedback["min_sample_reached"]
    assert feedback["difference"] == 1.0 and feedback["sequential_p_value"] < 0.05
    assert results["peeking_warning"]


# --- the statistics, against scipy's figures computed once -----------------------------------------


def test_two_proportion_z_test_matches_the_reference():
    result = stats.two_proportions(30, 200, 18, 210, min_sample=100)

    assert result["z"] == pytest.approx(2.0237466523808973, rel=1e-12)
    assert result["p_value"] == pytest.approx(0.04299622577082097, rel=1e-9)
    assert result["ci_low"] == pytest.approx(0.001976186015924558, rel=1e-9)
    assert result["ci_high"] == pytest.approx(0.126595242555504, rel=1e-9)
    # Always valid: far more cautious than the fixed-horizon p at this sample.
    assert result["sequential_p_value"] == pytest.approx(0.4409895336324441, rel=1e-9)


def test_welch_t_test_matches_the_reference():
    a = [120, 135, 150, 110, 160, 145, 170, 125, 140, 155, 165, 130]
    b = [100, 115, 105, 98, 120, 110, 125, 108, 102, 118]

    result = stats.welch(a, b, min_sample=10)

    assert result["t"] == pytest.approx(5.210116899754769, rel=1e-9)
    assert result["p_value"] == pytest.approx(7.76284682369197e-05, rel=1e-7)
    assert result["df"] == pytest.approx(16.513444480654748, rel=1e-9)
    assert result["ci_low"] == pytest.approx(19.002682596746027, rel=1e-9)
    assert result["ci_high"] == pytest.approx(44.96398406992067, rel=1e-9)
    assert result["difference"] == pytest.approx(31.98333333333335)
    assert result["sequential_p_value"] == pytest.approx(0.0010153925546430953, rel=1e-9)


def test_degenerate_samples_give_no_p_value_rather_than_an_error():
    assert stats.welch([], [1.0, 2.0], min_sample=10)["p_value"] is None
    assert stats.welch([1.0], [1.0, 2.0], min_sample=10)["p_value"] is None
    assert stats.welch([1.0, 1.0], [1.0, 1.0], min_sample=10)["p_value"] == 1.0
    assert stats.two_proportions(0, 0, 1, 10, min_sample=10)["p_value"] is None
    assert stats.two_proportions(0, 10, 0, 10, min_sample=10)["p_value"] == 1.0
    assert stats.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and stats.percentile([], 95) is None


def test_the_sequential_p_value_controls_false_positives_under_repeated_looks():
    """A/A: 200 simulated experiments, looked at after every 20 requests per arm up to 400; the
    fixed-horizon p dips under 0.05 at some look far more often than the always-valid one does."""
    import random

    rng = random.Random(13)
    fixed_hits = sequential_hits = 0
    for _ in range(200):
        a, b = [], []
        fixed = sequential = False
        for _look in range(20):
            a += [rng.gauss(100, 20) for _ in range(20)]
            b += [rng.gauss(100, 20) for _ in range(20)]
            result = stats.welch(a, b, min_sample=100)
            fixed |= result["p_value"] < 0.05
            sequential |= result["sequential_p_value"] < 0.05
        fixed_hits += fixed
        sequential_hits += sequential
    assert sequential_hits / 200 <= 0.05
    assert fixed_hits > 2 * sequential_hits


# --- the admin ---------------------------------------------------------------------------------


def _admin_form(agent_id: int, variants: list[dict], **fields) -> dict:
    data = {"name": "from-admin", "agent": agent_id, "description": "", "mode": "ab", "flag": "",
            "min_sample": 100, "canary_steps": "[]", "canary_interval_minutes": 60,
            "canary_max_error_rate_delta": 0.05, "canary_max_p95_ratio": 1.5, "canary_min_sample": 20,
            "shadow_variant": "", "shadow_percent": 0,
            "variants-TOTAL_FORMS": len(variants), "variants-INITIAL_FORMS": 0, "variants-MIN_NUM_FORMS": 2,
            "variants-MAX_NUM_FORMS": 1000, **fields}
    for i, v in enumerate(variants):
        for key, value in {"name": "", "weight": 0, "model": "", "fallback_models": "", "system_prompt": "",
                           "temperature": "", "max_tokens": "", "skills": "", **v}.items():
            if key == "is_control":
                if value:
                    data[f"variants-{i}-is_control"] = "on"
                continue
            data[f"variants-{i}-{key}"] = value
    return data


def test_the_admin_form_checks_the_variants_and_audits_the_save(admin_client, demo):
    url = "/admin/experiments/experiment/add/"
    bad = admin_client.post(url, _admin_form(demo.id, [{"name": "control", "weight": 60, "is_control": True},
                                                       {"name": "b", "weight": 30, "model": "local/b"}]))
    assert bad.status_code == 200 and "the weights must sum to 100 (they sum to 90)" in bad.content.decode()
    assert Experiment.objects.count() == 0

    good = admin_client.post(url, _admin_form(demo.id, [{"name": "control", "weight": 60, "is_control": True},
                                                        {"name": "b", "weight": 40, "model": "local/b"}]))
    assert good.status_code == 302, good.content.decode()[:2000]
    experiment = Experiment.objects.get()
    assert experiment.status == "draft" and [v.weight for v in experiment.variants.all()] == [60, 40]
    # Empty boxes inherit the agent's configuration: only the model is overridden.
    assert [v.overrides() for v in experiment.variants.all()] == [{}, {"model": "local/b"}]
    entry = AuditLog.objects.get(action="experiment.created")
    assert entry.actor.startswith("user:") and entry.details["after"]["variants"][1]["model"] == "local/b"

    started = admin_client.post("/admin/experiments/experiment/", {"action": "start_selected",
                                                                   "_selected_action": [experiment.pk]}, follow=True)
    assert "Started 1 experiment" in started.content.decode()
    experiment.refresh_from_db()
    assert experiment.status == "running" and experiment.started_at is not None
    page = admin_client.get(f"/admin/experiments/experiment/{experiment.pk}/results/")
    assert page.status_code == 200 and "Minimum sample not reached" in page.content.decode()
    assert admin_client.get("/admin/experiments/experiment/999/results/").status_code == 404

    deleted = admin_client.post(f"/admin/experiments/experiment/{experiment.pk}/delete/", {"post": "yes"})
    assert deleted.status_code == 302 and not Experiment.objects.exists()
    assert AuditLog.objects.get(action="experiment.deleted").details["before"]["status"] == "running"
