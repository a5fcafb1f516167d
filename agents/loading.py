"""Agent definitions from a file: parse, validate every entry, then upsert all or nothing.

The format (see agents/fixtures/demo_agents.yaml for a commented example) is a mapping with
an `agents:` list and an optional `skills:` list. Entries are upserted by name; on update only
the keys an entry gives change, so fields edited in the admin and absent from the file stay.

Validation reports every bad entry, not the first, because a file is fixed in one sitting:
the operator gets the whole list, each line starting with the entry's position
(`agents[2] (name 'x'): model: ...`). Field values go through the models' own validators
(full_clean on an unsaved instance, which includes Agent.clean) so the file and the admin
accept exactly the same values. Writes go through Model.save() (update_or_create), so the
cache-invalidation signals in agents/signals.py fire as they do for admin saves.

`${NAME}` in an agent's `model` or `fallback_models` is replaced by a variable (today only
DEMO_MODEL, from settings), so the demo file follows the configured demo model.

demo_seed() lives here too: it is this loader plus the demo's superuser and API key.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models, transaction

from agentplatform.errors import InvalidRequest

from .models import Agent, AgentSkill, Document, Skill
from .skills import BUILTINS, builtin_skill_defaults

DEMO_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "demo_agents.yaml"
DEMO_ADMIN_USERNAME = "admin"
DEMO_API_KEY_NAME = "demo"

TOP_LEVEL_KEYS = ("agents", "skills")
_VARIABLE_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class DefinitionsInvalid(InvalidRequest):
    """One or more entries are bad; `errors` holds one line per problem, nothing was written."""

    code = "invalid_definitions"

    def __init__(self, errors: list[str], *, bad_entries: int) -> None:
        self.errors = errors
        noun = "entry" if bad_entries == 1 else "entries"
        super().__init__(f"{bad_entries} invalid {noun}; nothing was written.", details=errors)


@dataclass
class LoadResult:
    agents_created: list[str] = field(default_factory=list)
    agents_updated: list[str] = field(default_factory=list)
    # Existing agents left alone (overwrite=False).
    agents_kept: list[str] = field(default_factory=list)
    skills_created: list[str] = field(default_factory=list)
    skills_updated: list[str] = field(default_factory=list)
    skills_kept: list[str] = field(default_factory=list)
    documents_written: int = 0
    dry_run: bool = False

    @property
    def agent_names(self) -> list[str]:
        return self.agents_created + self.agents_updated + self.agents_kept

    def summary(self) -> str:
        agents = len(self.agents_created) + len(self.agents_updated)
        skills = len(self.skills_created) + len(self.skills_updated)
        text = (f"{agents} agent{'s' if agents != 1 else ''} (created {len(self.agents_created)}, "
                f"updated {len(self.agents_updated)}) and {skills} skill{'s' if skills != 1 else ''}")
        kept = len(self.agents_kept) + len(self.skills_kept)
        if kept:
            text += f"; kept {len(self.agents_kept)} existing agents and {len(self.skills_kept)} existing skills"
        if self.dry_run:
            return f"Dry run: would load {text}. Nothing was written."
        return f"Loaded {text}."


# --- Reading a file ----------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error, not "last one wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def definitions_parse(*, text: str, fmt: str = "yaml", source: str = "<string>") -> Any:
    """Parse YAML or JSON text; InvalidRequest with the line and column when it is malformed."""
    if fmt == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{source}: malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).",
                                 code="malformed_file") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise InvalidRequest(f"{source}: malformed YAML: {problem}{where}.", code="malformed_file") from None


def definitions_read(*, path: str | Path) -> Any:
    """Read and parse a definitions file: .json is JSON, .yaml/.yml YAML, anything else is sniffed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidRequest(f"{path}: no such file.", code="file_not_found") from None
    except IsADirectoryError:
        raise InvalidRequest(f"{path}: is a directory, not a file.", code="file_not_found") from None
    except UnicodeDecodeError:
        raise InvalidRequest(f"{path}: not UTF-8 text.", code="malformed_file") from None
    except OSError as exc:
        raise InvalidRequest(f"{path}: cannot read: {exc.strerror}.", code="file_not_found") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        fmt = "json"
    elif suffix in (".yaml", ".yml"):
        fmt = "yaml"
    else:
        fmt = "json" if text.lstrip().startswith(("{", "[")) else "yaml"
    return definitions_parse(text=text, fmt=fmt, source=str(path))


# --- Validation --------------------------------------------------------------------------


def definition_variables() -> dict[str, str]:
    """What `${NAME}` may refer to in an agent's model strings."""
    return {"DEMO_MODEL": settings.DEMO_MODEL}


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_number(value: Any) -> bool:
    """A finite int or float that a float column holds (10**400 is an int Python cannot make a float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# key -> (type check, what the error says it should be)
_TypeRule = tuple[Any, str]
SKILL_KEYS: dict[str, _TypeRule] = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "description": (lambda v: isinstance(v, str), "a string"),
    "kind": (lambda v: isinstance(v, str), "a string"),
    "parameters": (lambda v: isinstance(v, dict) and _is_json(v), "a JSON schema object"),
    "config": (lambda v: isinstance(v, dict) and _is_json(v), "a JSON object"),
    "enabled": (lambda v: isinstance(v, bool), "true or false"),
}
AGENT_KEYS: dict[str, _TypeRule] = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "description": (lambda v: isinstance(v, str), "a string"),
    "model": (lambda v: isinstance(v, str), 'a string, "provider/model-name"'),
    "system_prompt": (lambda v: isinstance(v, str), "a string"),
    "temperature": (_is_number, "a finite number"),
    "max_tokens": (_is_int, "an integer"),
    "timeout_seconds": (_is_int, "an integer"),
    "max_retries": (lambda v: v is None or _is_int(v), "an integer, or null for the LLM_MAX_RETRIES setting"),
    "enabled": (lambda v: isinstance(v, bool), "true or false"),
    "metadata": (lambda v: isinstance(v, dict) and _is_json(v),
                 "a JSON object (quote dates: YAML reads 2024-01-01 as a date)"),
    "skills": (_is_str_list, "a list of skill names"),
    "fallback_models": (_is_str_list, "a list of model strings"),
    "documents": (lambda v: isinstance(v, list), "a list of {title, content, source} objects"),
}
DOCUMENT_KEYS: dict[str, _TypeRule] = {
    "title": (lambda v: isinstance(v, str), "a string"),
    "content": (lambda v: isinstance(v, str), "a string"),
    "source": (lambda v: isinstance(v, str), "a string"),
}
# Keys that are not model fields (handled separately) or are required in the file.
_AGENT_RELATIONS = ("skills", "documents")
_AGENT_REQUIRED = ("name", "model")
_DOCUMENT_REQUIRED = ("title", "content")


class _Errors:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.entries: set[str] = set()

    def add(self, label: str, message: str, *, entry: str | None = None) -> None:
        self.lines.append(f"{label}: {message}")
        self.entries.add(entry or label)

    def __bool__(self) -> bool:
        return bool(self.lines)


def _label(section: str, index: int, entry: Any) -> str:
    name = entry.get("name") if isinstance(entry, dict) else None
    return f"{section}[{index}] (name {name!r})" if isinstance(name, str) else f"{section}[{index}]"


def _check_keys(entry: dict, rules: dict[str, _TypeRule], label: str, errors: _Errors,
                entry_label: str | None = None) -> dict:
    """The entry's keys that are known and of the right type; reports the others."""
    good = {}
    for key, value in entry.items():
        if key not in rules:
            errors.add(label, f"unknown key {key!r} (allowed: {', '.join(rules)})", entry=entry_label)
            continue
        check, expected = rules[key]
        if not check(value):
            errors.add(label, f"{key}: must be {expected}, got {json.dumps(value, default=str)[:80]}",
                       entry=entry_label)
            continue
        good[key] = value
    return good


def _model_errors(instance: models.Model, exclude: list[str]) -> dict[str, list[str]]:
    try:
        # Uniqueness is the upsert's business (and duplicates in the file are checked apart).
        instance.full_clean(exclude=exclude, validate_unique=False, validate_constraints=False)
    except ValidationError as exc:
        return exc.message_dict
    return {}


def _report_model_errors(found: dict[str, list[str]], label: str, errors: _Errors) -> None:
    for field_name, messages in found.items():
        for message in messages:
            errors.add(label, message if field_name == "__all__" else f"{field_name}: {message}")


def _substitute(value: str, variables: Mapping[str, str]) -> tuple[str, list[str]]:
    unknown: list[str] = []

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in variables:
            unknown.append(name)
            return match.group(0)
        return variables[name]

    return _VARIABLE_RE.sub(replace, value), unknown


@dataclass
class _SkillPlan:
    name: str
    fields: dict  # the keys the entry gives (plus a new built-in's defaults)
    exists: bool


@dataclass
class _AgentPlan:
    name: str
    fields: dict
    skills: list[str] | None
    documents: list[dict] | None
    exists: bool


def _plan_skills(entries: Any, errors: _Errors) -> list[_SkillPlan]:
    if not isinstance(entries, list):
        errors.add("skills", "must be a list of skill definitions")
        return []
    plans: list[_SkillPlan] = []
    first_seen: dict[str, int] = {}
    existing = {s.name: s for s in Skill.objects.filter(
        name__in=[e["name"] for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)])}
    for index, entry in enumerate(entries):
        label = _label("skills", index, entry)
        if not isinstance(entry, dict):
            errors.add(label, f"must be a mapping, got {type(entry).__name__}")
            continue
        before = len(errors.lines)
        given = _check_keys(entry, SKILL_KEYS, label, errors)
        name = given.get("name")
        if "name" not in entry:
            errors.add(label, "name: required")
        if isinstance(name, str):
            if name in first_seen:
                errors.add(label, f"name: {name!r} is defined twice (first at skills[{first_seen[name]}])")
            else:
                first_seen[name] = index
        kind = given.get("kind", existing[name].kind if name in existing else Skill.Kind.BUILTIN)
        if kind == Skill.Kind.BUILTIN and isinstance(name, str):
            if name not in BUILTINS:
                errors.add(label, f"name: {name!r} is not a built-in skill (built-ins: {', '.join(BUILTINS)}); "
                                  "use kind: http for an HTTP endpoint")
            elif name not in existing:
                # On create a built-in gets its code's description and schema unless the file overrides them.
                given = {**builtin_skill_defaults(name), **given}
        if kind == Skill.Kind.HTTP:
            config = given.get("config", existing[name].config if name in existing else {})
            url = config.get("url") if isinstance(config, dict) else None
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                errors.add(label, "config: an http skill needs config.url, an http(s) URL")
        if name in existing:
            instance = existing[name]
            for key, value in given.items():
                setattr(instance, key, value)
        else:
            instance = Skill(**given)
        bad_types = [k for k in SKILL_KEYS if k in entry and k not in given]
        if "name" not in entry:
            bad_types.append("name")  # reported above as "required"
        _report_model_errors(_model_errors(instance, bad_types), label, errors)
        if len(errors.lines) == before and isinstance(name, str):
            plans.append(_SkillPlan(name=name, fields=given, exists=name in existing))
    return plans


def _plan_documents(value: list, label: str, errors: _Errors) -> list[dict]:
    documents: list[dict] = []
    titles: set[str] = set()
    for index, entry in enumerate(value):
        doc_label = f"{label}: documents[{index}]"
        if not isinstance(entry, dict):
            errors.add(doc_label, f"must be a mapping, got {type(entry).__name__}", entry=label)
            continue
        before = len(errors.lines)
        given = _check_keys(entry, DOCUMENT_KEYS, doc_label, errors, entry_label=label)
        for key in _DOCUMENT_REQUIRED:
            if key not in entry:
                errors.add(doc_label, f"{key}: required", entry=label)
        title = given.get("title")
        if isinstance(title, str):
            if title in titles:
                errors.add(doc_label, f"title: {title!r} is given twice for this agent", entry=label)
            titles.add(title)
        # The agent is not known yet (it may be new): check the fields alone.
        found = _model_errors(Document(**given), ["agent", *[k for k in DOCUMENT_KEYS if k not in given]])
        for field_name, messages in found.items():
            for message in messages:
                errors.add(doc_label, f"{field_name}: {message}", entry=label)
        if len(errors.lines) == before:
            documents.append(given)
    return documents


def _plan_agents(entries: Any, known_skills: set[str], variables: Mapping[str, str],
                 errors: _Errors) -> list[_AgentPlan]:
    if not isinstance(entries, list):
        errors.add("agents", "must be a list of agent definitions")
        return []
    plans: list[_AgentPlan] = []
    first_seen: dict[str, int] = {}
    existing = {a.name: a for a in Agent.objects.filter(
        name__in=[e["name"] for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)])}
    for index, entry in enumerate(entries):
        label = _label("agents", index, entry)
        if not isinstance(entry, dict):
            errors.add(label, f"must be a mapping, got {type(entry).__name__}")
            continue
        before = len(errors.lines)
        given = _check_keys(entry, AGENT_KEYS, label, errors)
        for key in _AGENT_REQUIRED:
            if key not in entry:
                errors.add(label, f"{key}: required")
        name = given.get("name")
        if isinstance(name, str):
            if name in first_seen:
                errors.add(label, f"name: {name!r} is defined twice (first at agents[{first_seen[name]}])")
            else:
                first_seen[name] = index

        for key in ("model", "fallback_models"):
            if key not in given:
                continue
            values = given[key] if isinstance(given[key], list) else [given[key]]
            substituted = []
            for value in values:
                value, unknown = _substitute(value, variables)
                known = ", ".join(variables) or "none"
                for variable in unknown:
                    errors.add(label, f"{key}: unknown variable ${{{variable}}} (known: {known})")
                substituted.append(value)
            given[key] = substituted if isinstance(given[key], list) else substituted[0]
        if "temperature" in given:
            given["temperature"] = float(given["temperature"])

        skills = given.pop("skills", None)
        if skills is not None:
            seen: set[str] = set()
            for skill in skills:
                if skill in seen:
                    errors.add(label, f"skills: {skill!r} is listed twice")
                seen.add(skill)
                if skill not in known_skills and skill not in BUILTINS:
                    errors.add(label, f"skills: unknown skill {skill!r} (define it under `skills:` in this file "
                                      "or create it first)")
        documents = given.pop("documents", None)
        if documents is not None:
            documents = _plan_documents(documents, label, errors)

        if name in existing:
            instance = existing[name]
            for key, value in given.items():
                setattr(instance, key, value)
        else:
            instance = Agent(**given)
        bad_types = [k for k in AGENT_KEYS if k in entry and k not in given and k not in _AGENT_RELATIONS]
        # A missing name or model is reported above as "required"; don't say it twice.
        bad_types += [k for k in _AGENT_REQUIRED if k not in entry]
        _report_model_errors(_model_errors(instance, bad_types), label, errors)
        if len(errors.lines) == before and isinstance(name, str):
            plans.append(_AgentPlan(name=name, fields=given, skills=skills, documents=documents,
                                    exists=name in existing))
    return plans


# --- Loading -----------------------------------------------------------------------------


def _write_agent(plan: _AgentPlan, skills: dict[str, Skill]) -> Agent:
    agent, _ = Agent.objects.update_or_create(name=plan.name, defaults=plan.fields)
    if plan.skills is not None:
        for position, skill_name in enumerate(plan.skills):
            AgentSkill.objects.update_or_create(agent=agent, skill=skills[skill_name],
                                                defaults={"position": position})
        # Instance deletes, so the post_delete signal drops the agent's cached spec.
        for link in AgentSkill.objects.filter(agent=agent).exclude(skill__name__in=plan.skills):
            link.delete()
    for document in plan.documents or []:
        Document.objects.update_or_create(agent=agent, title=document["title"],
                                          defaults={k: v for k, v in document.items() if k != "title"})
    return agent


@transaction.atomic
def agents_load(*, definitions: Any, dry_run: bool = False, overwrite: bool = True,
                variables: Mapping[str, str] | None = None) -> LoadResult:
    """Validate every entry of parsed definitions, then upsert them all, or raise DefinitionsInvalid.

    overwrite=False creates what is missing and leaves existing agents and skills as they are
    (the demo seed: an operator may have edited them in the admin since).
    """
    variables = definition_variables() if variables is None else variables
    errors = _Errors()
    if not isinstance(definitions, dict):
        errors.add("top level", "must be a mapping with an `agents:` list and an optional `skills:` list")
        raise DefinitionsInvalid(errors.lines, bad_entries=1)
    for key in definitions:
        if key not in TOP_LEVEL_KEYS:
            errors.add("top level", f"unknown key {key!r} (allowed: {', '.join(TOP_LEVEL_KEYS)})")
    if "agents" not in definitions and "skills" not in definitions:
        errors.add("top level", "an `agents:` list is required")

    skill_entries = definitions.get("skills") or []
    agent_entries = definitions.get("agents") or []
    skill_plans = _plan_skills(skill_entries, errors)
    agent_entries_ok = agent_entries if isinstance(agent_entries, list) else []
    skill_entries_ok = skill_entries if isinstance(skill_entries, list) else []
    file_skills = {e["name"] for e in skill_entries_ok if isinstance(e, dict) and isinstance(e.get("name"), str)}
    wanted = {s for e in agent_entries_ok if isinstance(e, dict) and _is_str_list(e.get("skills"))
              for s in e["skills"]}
    db_skills = set(Skill.objects.filter(name__in=wanted).values_list("name", flat=True))
    agent_plans = _plan_agents(agent_entries, file_skills | db_skills, variables, errors)
    if errors:
        raise DefinitionsInvalid(errors.lines, bad_entries=len(errors.entries))

    result = LoadResult(dry_run=dry_run)
    # Built-ins that agents use and that neither the file nor the database has yet.
    implicit = sorted(wanted - file_skills - db_skills)
    for plan in skill_plans:
        if plan.exists and not overwrite:
            result.skills_kept.append(plan.name)
        else:
            (result.skills_updated if plan.exists else result.skills_created).append(plan.name)
    result.skills_created += implicit
    for plan in agent_plans:
        if plan.exists and not overwrite:
            result.agents_kept.append(plan.name)
        else:
            (result.agents_updated if plan.exists else result.agents_created).append(plan.name)
            result.documents_written += len(plan.documents or [])
    if dry_run:
        return result

    for plan in skill_plans:
        if plan.exists and not overwrite:
            continue
        Skill.objects.update_or_create(name=plan.name, defaults=plan.fields)
    for name in implicit:
        Skill.objects.create(name=name, kind=Skill.Kind.BUILTIN, **builtin_skill_defaults(name))
    skills = {s.name: s for s in Skill.objects.filter(name__in=wanted)}
    for plan in agent_plans:
        if plan.exists and not overwrite:
            continue
        _write_agent(plan, skills)
    return result


# --- The demo ----------------------------------------------------------------------------


@dataclass
class DemoSeedResult:
    admin_user: str
    admin_password: str | None  # None when the user existed already
    api_key: str | None  # None when the key existed already
    load: LoadResult


@transaction.atomic
def demo_seed(*, fixture: str | Path = DEMO_FIXTURE) -> DemoSeedResult:
    """Create what the demo needs and is missing: skills, agents, a superuser, an admin API key.

    Idempotent; never overwrites. The password and key are returned once and never stored in clear.
    """
    from django.contrib.auth import get_user_model

    from governance.models import ApiKey
    from governance.services import api_key_create

    load = agents_load(definitions=definitions_read(path=fixture), overwrite=False)

    User = get_user_model()
    user = User.objects.filter(**{User.USERNAME_FIELD: DEMO_ADMIN_USERNAME}).first()
    password = None
    if user is None:
        password = secrets.token_urlsafe(12)
        user = User.objects.create_superuser(DEMO_ADMIN_USERNAME, "", password)

    key = None
    if not ApiKey.objects.filter(name=DEMO_API_KEY_NAME).exists():
        _, key = api_key_create(name=DEMO_API_KEY_NAME, role=ApiKey.Role.ADMIN, created_by=user)
    return DemoSeedResult(admin_user=DEMO_ADMIN_USERNAME, admin_password=password, api_key=key, load=load)
