"""Management commands: load_agents, create_api_key, seed_demo."""

from __future__ import annotations

import io
import json
import re

import pytest
from django.conf import settings
from django.contrib.auth import authenticate, get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

from agents.models import Agent, AgentSkill, Document, Skill
from governance.models import ApiKey
from governance.selectors import principal_for_key
from governance.services import hash_secret

SECRET_RE = re.compile(r"ap_[0-9a-f]+_[A-Za-z0-9_-]+")


def run(*args, **options) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


def run_failing(*args, **options) -> tuple[str, str]:
    """Stderr and the CommandError's message of a command expected to fail."""
    err = io.StringIO()
    with pytest.raises(CommandError) as excinfo:
        call_command(*args, stdout=io.StringIO(), stderr=err, **options)
    return err.getvalue(), str(excinfo.value)


def counts() -> dict[str, int]:
    return {model.__name__: model.objects.count()
            for model in (Agent, Skill, AgentSkill, Document, ApiKey, get_user_model())}


def linked_skills(name: str) -> list[str]:
    return list(AgentSkill.objects.filter(agent__name=name).order_by("position")
                .values_list("skill__name", flat=True))


GOOD_YAML = """
skills:
  - name: weather
    kind: http
    description: Today's weather.
    parameters: {type: object, properties: {city: {type: string}}}
    config: {url: "https://tools.example.com/weather"}
  - name: http_fetch
    config: {allowed_hosts: [example.com]}
agents:
  - name: helper
    model: openai/gpt-4o-mini
    system_prompt: Be brief.
    temperature: 0.2
    max_tokens: 500
    skills: [weather, calculator, http_fetch]
    fallback_models: [local/demo, openai/gpt-4o]
    metadata: {team: support}
  - name: plain
    model: local/demo
"""


@pytest.fixture
def write(tmp_path):
    def write(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return str(path)
    return write


# --- load_agents -------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_loads_agents_from_yaml(write):
    out, err = run("load_agents", write("agents.yaml", GOOD_YAML))

    assert "Loaded 2 agents (created 2, updated 0) and 3 skills." in out
    assert err == ""
    helper = Agent.objects.get(name="helper")
    assert helper.model == "openai/gpt-4o-mini"
    assert helper.temperature == 0.2
    assert helper.max_tokens == 500
    assert helper.fallback_models == ["local/demo", "openai/gpt-4o"]
    assert helper.metadata == {"team": "support"}
    assert linked_skills("helper") == ["weather", "calculator", "http_fetch"]
    assert Agent.objects.get(name="plain").max_tokens == 1024  # the model default
    # The built-in used but not defined in the file is created from its code's defaults.
    calculator = Skill.objects.get(name="calculator")
    assert calculator.kind == Skill.Kind.BUILTIN and calculator.description and calculator.parameters
    http_fetch = Skill.objects.get(name="http_fetch")
    assert http_fetch.config == {"allowed_hosts": ["example.com"]}
    assert http_fetch.parameters["type"] == "object"  # defaulted: the file gave none
    assert Skill.objects.get(name="weather").kind == Skill.Kind.HTTP


@pytest.mark.django_db
def test_it_loads_agents_from_json(write):
    definitions = {
        "agents": [{"name": "j1", "model": "local/demo", "skills": ["current_time", "calculator"],
                    "fallback_models": ["openai/gpt-4o-mini"]}],
    }
    out, _ = run("load_agents", write("agents.json", json.dumps(definitions)))

    assert "Loaded 1 agent (created 1, updated 0) and 2 skills." in out
    assert linked_skills("j1") == ["current_time", "calculator"]
    assert Agent.objects.get(name="j1").fallback_models == ["openai/gpt-4o-mini"]


@pytest.mark.django_db
def test_it_sniffs_json_without_an_extension(write):
    run("load_agents", write("agents.txt", '{"agents": [{"name": "sniffed", "model": "local/demo"}]}'))

    assert Agent.objects.filter(name="sniffed").exists()


@pytest.mark.django_db
def test_it_upserts_an_existing_agent(write):
    run("load_agents", write("first.yaml", GOOD_YAML))
    before = Agent.objects.get(name="helper")

    out, _ = run("load_agents", write("second.yaml", """
agents:
  - name: helper
    model: local/other
    temperature: 1.5
    skills: [http_fetch, weather]
"""))

    assert "Loaded 1 agent (created 0, updated 1) and 0 skills." in out
    helper = Agent.objects.get(name="helper")
    assert helper.pk == before.pk
    assert helper.model == "local/other"
    assert helper.temperature == 1.5
    assert helper.system_prompt == "Be brief."  # not in the second file: kept
    assert linked_skills("helper") == ["http_fetch", "weather"]  # calculator unlinked, order as listed
    assert Agent.objects.count() == 2


@pytest.mark.django_db
def test_it_reports_every_bad_entry_and_writes_nothing(write):
    Agent.objects.create(name="existing", model="local/demo", temperature=0.5)
    before = counts()
    path = write("bad.yaml", """
agents:
  - name: fine
    model: local/demo
  - name: badmodel
    model: gpt-4o
  - name: noskill
    model: local/demo
    skills: [calculator, teleport]
  - name: hot
    model: local/demo
    temperature: 3
  - name: fine
    model: local/demo
  - name: extra
    model: local/demo
    colour: blue
  - name: existing
    model: local/demo
    temperature: 1.0
""")

    err, message = run_failing("load_agents", path)

    assert "agents[1] (name 'badmodel'): model: Write the model as \"provider/model-name\"" in err
    assert "agents[2] (name 'noskill'): skills: unknown skill 'teleport'" in err
    assert "agents[3] (name 'hot'): temperature: Ensure this value is less than or equal to 2.0." in err
    assert "agents[4] (name 'fine'): name: 'fine' is defined twice (first at agents[0])" in err
    assert "agents[5] (name 'extra'): unknown key 'colour'" in err
    assert "agents[0]" not in err.replace("(first at agents[0])", "")
    assert "agents[6]" not in err
    assert "5 invalid entries; nothing was written." in message
    assert counts() == before
    assert Agent.objects.get(name="existing").temperature == 0.5
    assert not Skill.objects.filter(name="calculator").exists()  # no implicit built-in either


@pytest.mark.django_db
def test_it_reports_bad_types_and_bad_skills(write):
    err, _ = run_failing("load_agents", write("bad.yaml", """
skills:
  - name: teleport
  - name: hook
    kind: http
agents:
  - name: typed
    model: local/demo
    max_tokens: "lots"
    enabled: "yes"
  - model: local/demo
"""))

    assert "skills[0] (name 'teleport'): name: 'teleport' is not a built-in skill" in err
    assert "skills[1] (name 'hook'): config: an http skill needs config.url" in err
    assert "agents[0] (name 'typed'): max_tokens: must be an integer" in err
    assert "agents[0] (name 'typed'): enabled: must be true or false" in err
    assert "agents[1]: name: required" in err
    assert Skill.objects.count() == 0 and Agent.objects.count() == 0


@pytest.mark.django_db
def test_it_substitutes_the_demo_model(write):
    err, _ = run_failing("load_agents", write("vars.yaml", """
agents:
  - name: v1
    model: "${DEMO_MODEL}"
  - name: v2
    model: "${NOPE}"
"""))
    assert "agents[1] (name 'v2'): model: unknown variable ${NOPE} (known: DEMO_MODEL)" in err
    assert "agents[0]" not in err

    run("load_agents", write("vars.yaml", 'agents: [{name: v1, model: "${DEMO_MODEL}"}]'))

    assert Agent.objects.get(name="v1").model == settings.DEMO_MODEL


@pytest.mark.django_db
def test_it_validates_without_writing_on_dry_run(write):
    out, _ = run("load_agents", write("agents.yaml", GOOD_YAML), dry_run=True)

    assert "would load 2 agents (created 2, updated 0) and 3 skills" in out
    assert Agent.objects.count() == 0 and Skill.objects.count() == 0


@pytest.mark.django_db
def test_it_refuses_malformed_yaml(write):
    err, message = run_failing("load_agents", write("broken.yaml", "agents:\n  - name: [unclosed\n"))

    assert "malformed YAML" in message and "line" in message
    assert "Traceback" not in err
    assert Agent.objects.count() == 0


@pytest.mark.django_db
def test_it_refuses_malformed_json(write):
    _, message = run_failing("load_agents", write("broken.json", '{"agents": [}'))

    assert "malformed JSON" in message and "line 1" in message


@pytest.mark.django_db
def test_it_refuses_a_missing_file(tmp_path):
    _, message = run_failing("load_agents", str(tmp_path / "nope.yaml"))

    assert "no such file" in message


@pytest.mark.django_db
def test_it_refuses_a_file_that_is_not_a_mapping(write):
    err, _ = run_failing("load_agents", write("list.yaml", "- name: a\n"))

    assert "top level: must be a mapping" in err


# --- create_api_key ----------------------------------------------------------------------


@pytest.mark.django_db
def test_it_creates_an_api_key_as_json():
    Agent.objects.create(name="a1", model="local/demo")
    Agent.objects.create(name="a2", model="local/demo")

    out, _ = run("create_api_key", name="ci", role="developer", agents="a1, a2", expires_in_days=30, json=True)

    body = json.loads(out)  # exactly one JSON object
    assert set(body) == {"key", "prefix", "name", "role", "all_agents", "agents", "expires_at"}
    assert body["name"] == "ci" and body["role"] == "developer"
    assert (body["all_agents"], body["agents"]) == (False, ["a1", "a2"])
    assert body["expires_at"] is not None
    principal = principal_for_key(body["key"])
    assert principal is not None
    assert principal.role == "developer"
    assert principal.agents == frozenset({"a1", "a2"})
    stored = ApiKey.objects.get(prefix=body["prefix"])
    assert stored.secret_hash == hash_secret(body["key"])
    assert body["key"] not in {stored.name, stored.prefix, stored.secret_hash}


@pytest.mark.django_db
def test_it_prints_the_secret_once_with_a_warning():
    out, _ = run("create_api_key", "--name", "ops", "--role", "admin")

    secrets_shown = SECRET_RE.findall(out)
    assert len(secrets_shown) == 1
    assert "will not be shown again" in out
    principal = principal_for_key(secrets_shown[0])
    assert principal.role == "admin" and principal.agents is None
    assert "agents: all" in out


@pytest.mark.django_db
def test_it_says_all_agents_explicitly():
    Agent.objects.create(name="a1", model="local/demo")

    out, _ = run("create_api_key", "--name", "ops", "--role", "client", "--all-agents", "--json")

    body = json.loads(out)
    assert (body["all_agents"], body["agents"]) == (True, [])
    assert principal_for_key(body["key"]).agents is None
    assert ApiKey.objects.get(prefix=body["prefix"]).all_agents is True


@pytest.mark.django_db
def test_it_refuses_an_empty_agent_list_rather_than_guess():
    _, message = run_failing("create_api_key", name="x", role="client", agents=" , ")

    assert "--agents needs at least one agent name; use --all-agents" in message
    assert ApiKey.objects.count() == 0


@pytest.mark.django_db
def test_it_refuses_agents_and_all_agents_together():
    Agent.objects.create(name="a1", model="local/demo")

    with pytest.raises(CommandError):
        call_command("create_api_key", "--name", "x", "--role", "client", "--agents", "a1", "--all-agents",
                     stdout=io.StringIO(), stderr=io.StringIO())
    assert ApiKey.objects.count() == 0


@pytest.mark.django_db
def test_it_refuses_a_bad_role():
    _, message = run_failing("create_api_key", name="x", role="root")

    assert "role must be one of admin, developer, client" in message
    assert ApiKey.objects.count() == 0


@pytest.mark.django_db
def test_it_refuses_an_unknown_agent():
    Agent.objects.create(name="a1", model="local/demo")

    _, message = run_failing("create_api_key", name="x", role="client", agents="a1,ghost")

    assert "Unknown agents: ghost." in message
    assert ApiKey.objects.count() == 0


# --- seed_demo ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_seeds_the_demo_once():
    out, _ = run("seed_demo", json=True)
    body = json.loads(out)

    assert body["admin_user"] == "admin"
    assert {"assistant", "researcher", "echo"} <= set(body["agents"])
    assert authenticate(username="admin", password=body["admin_password"]) is not None
    principal = principal_for_key(body["api_key"])
    assert principal.role == "admin" and principal.name == "demo"
    for name in ("assistant", "researcher", "echo"):
        assert Agent.objects.get(name=name).model == settings.DEMO_MODEL
    assert linked_skills("assistant") == ["calculator", "current_time"]
    assert set(linked_skills("researcher")) == {"knowledge_search", "http_fetch"}
    assert linked_skills("echo") == []
    assert Document.objects.filter(agent__name="researcher").count() >= 3
    assert Skill.objects.get(name="http_fetch").config["allowed_hosts"] == ["example.com", "api.github.com"]
    assert set(Skill.objects.values_list("name", flat=True)) >= {
        "calculator", "current_time", "http_fetch", "knowledge_search"}

    before = counts()
    again, _ = run("seed_demo")

    assert counts() == before
    assert "already exists" in again
    assert not SECRET_RE.search(again)
    assert body["admin_password"] not in again


@pytest.mark.django_db
def test_it_keeps_edited_demo_agents_on_rerun():
    run("seed_demo")
    Agent.objects.filter(name="assistant").update(system_prompt="Edited in the admin.")
    Skill.objects.filter(name="http_fetch").update(config={"allowed_hosts": ["internal.example"]})

    out, _ = run("seed_demo", json=True)

    body = json.loads(out)
    assert body["admin_password"] is None and body["api_key"] is None
    assert Agent.objects.get(name="assistant").system_prompt == "Edited in the admin."
    assert Skill.objects.get(name="http_fetch").config == {"allowed_hosts": ["internal.example"]}


@pytest.mark.django_db
def test_it_prints_the_admin_password_that_logs_in():
    out, _ = run("seed_demo")

    password = re.search(r"with password: (\S+)", out).group(1)
    assert authenticate(username="admin", password=password) is not None
    assert len(SECRET_RE.findall(out)) == 1
