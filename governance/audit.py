"""The audit log: append-only, hash-chained, verifiable.

Appending. `audit_record(...)` is the only way in. It masks the details
(governance.masking.mask_data), caps them at DETAILS_MAX_BYTES and inserts one row. Call it
inside the transaction of the change it records, so the change and its audit row commit
together or not at all ("actions own the audit trail"); it opens its own transaction when there
is none.

The chain. Every entry has a place `seq` (1, 2, 3, ... without holes) and a `hash`: sha256 over
a canonical JSON of its fields and the previous entry's hash (`entry_hash`; `prev_hash` keeps
that previous hash). Who gives an entry its place depends on the database:

* PostgreSQL: the sequencer, off the request path. audit_record inserts the row without seq,
  prev_hash and hash, and takes no lock: concurrent workers' transactions never wait for one
  another to append (they used to: one advisory lock from the first append to the commit
  serialized every audited transaction of every worker, measured by bench/audit_bench.py).
  `audit_chain_sequence()` then takes the chain's lock (pg_try_advisory_xact_lock: one
  sequencer at a time, any number may try), reads the head (the entry with the highest seq)
  and chains up to `limit` committed unchained entries in id order, in one transaction: their
  hashes are computed from the values as stored, so verification recomputes exactly them.
  Entries of transactions still open are not visible to it and get their place in a later
  batch, after entries committed before them: the chain's order is the order in which entries
  were sequenced, not necessarily of their ids or timestamps. It runs in a loop
  (`manage.py audit_sequencer`, started by scripts/prod.sh; every AUDIT_SEQUENCER_INTERVAL_SECONDS),
  from beat every minute as a backstop, and before every verification. Each batch publishes
  the new head (seq and hash) in the log, line "audit chain head": keep those lines outside
  the database and any of them is an anchor for `verify_audit_log --anchor`.
* SQLite: in the transaction that appends, as before. Writers are serialized by the database
  itself: transactions begin IMMEDIATE (settings: transaction_mode), i.e. take the write lock
  before the first read, so no two appenders read the same head; nothing is gained by deferring.

Tamper evidence is what it was. An entry's content is fixed from its insert: on PostgreSQL the
trigger (migrations 0003, 0006) refuses every UPDATE and DELETE except the sequencer's one
update of an unchained entry, which sets seq, prev_hash and hash once and must leave every
other column as it is. Once chained, an altered, removed or reordered entry breaks the chain;
removing the newest entries is noticed against an anchor (a head published earlier). An entry
not yet chained (at most a sequencer interval old) is protected by the trigger alone; removing
it by going around the trigger (the table owner disabling it) is the same as removing the
newest entries of the chain, which an anchor taken before cannot show either.

Cheap on the request path, nothing lost on a crash. AuditStage.persist writes the
"request.served" entry inside the transaction that stores the run (agents.pipeline:
agentplatform.db.write_db group-commits finished runs, each in a savepoint): one INSERT inside a
commit the run pays for anyway, no lock, no extra fsync and no extra round trip for the client;
and it is durable exactly when the run is. A crash between commit and sequencing loses nothing:
the sequencer chains what is committed whenever it next runs. Refused turns (rate limit, guards,
budget) have no run: `AuditStage.refused` appends through write_db as well, awaited, so the
refusal is on disk before the error reaches the client.

Append-only. The model refuses updates and deletes: a pre_save receiver refuses any save that
is not audit_record's insert (an existing row, a primary key set by hand, a direct
`AuditLog.objects.create`), a pre_delete receiver refuses every delete — also
`QuerySet.delete()`, which sends pre_delete per row while a receiver is connected.
`QuerySet.update()` and raw SQL send no signal: on PostgreSQL the trigger of migration
0003_auditlog_append_only rejects UPDATE and DELETE at the database; on SQLite only the
ORM guard applies. Either way `manage.py verify_audit_log` detects an altered or removed row
(and, given a head recorded earlier with --anchor, removed newest rows).

Configuration changes (agents, skills, feature flags) are audited by governance.audit_signals,
imported at the bottom of this module; `audit_actor(...)` and `AuditedAdminMixin` name the
staff user behind a change.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import ipaddress
import json
import logging
import math
from dataclasses import dataclass
from datetime import date, datetime
from datetime import timezone as dt_timezone
from typing import TYPE_CHECKING, Any, Callable, Iterator

from django.db import connection, transaction
from django.db.models.signals import pre_delete, pre_save
from django.utils import timezone
from django.utils.ipv6 import clean_ipv6_address

from agentplatform.db import write_db
from agentplatform.errors import PlatformError

from .masking import mask_data
from .models import AuditLog

if TYPE_CHECKING:
    from django.http import HttpRequest

    from agents.pipeline import ChatTurn

logger = logging.getLogger("governance.audit")

# The prev_hash of the first entry.
GENESIS_HASH = "0" * 64
# Details larger than this (UTF-8 bytes of their JSON) are shortened, with a marker.
DETAILS_MAX_BYTES = 8 * 1024
# Strings inside oversized details are cut to this length first.
DETAILS_MAX_STRING = 512
# PostgreSQL advisory lock key of the sequencer: "auditlg" in ASCII, unlikely to collide.
AUDIT_CHAIN_LOCK = 0x61756469746C67
# Entries the sequencer chains in one transaction at most.
SEQUENCE_BATCH = 1000

_MAX_LENGTHS = {f.name: f.max_length for f in AuditLog._meta.concrete_fields if getattr(f, "max_length", None)}


class AuditLogAppendOnly(PlatformError):
    """Something tried to change or delete an audit entry, or to add one around audit_record."""

    http_status = 500
    code = "audit_log_append_only"
    message = "The audit log is append-only: entries are added by governance.audit.audit_record only."


# --- hashing -----------------------------------------------------------------------------


def _timestamp_text(value: datetime) -> str:
    return value.astimezone(dt_timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ip_text(value: str | None) -> str | None:
    # One spelling whatever the database hands back (PostgreSQL's inet has its own).
    return str(ipaddress.ip_address(value)) if value else None


def _canonical_numbers(value: Any) -> Any:
    # jsonb keeps numbers as decimals: 1e20 comes back as the integer 100000000000000000000.
    # Hash integral floats as integers so the hash survives the round trip.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical_numbers(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def entry_hash(*, prev_hash: str, timestamp: datetime, actor: str, action: str, target: str, request_id: str,
               client_ip: str | None, outcome: str, details: Any) -> str:
    """sha256 (hex) over the canonical JSON of an entry's fields and the previous entry's hash."""
    payload = {
        "prev_hash": prev_hash,
        "timestamp": _timestamp_text(timestamp),
        "actor": actor,
        "action": action,
        "target": target,
        "request_id": request_id,
        "client_ip": _ip_text(client_ip),
        "outcome": outcome,
        "details": _canonical_numbers(details),
    }
    return hashlib.sha256(_dumps(payload).encode()).hexdigest()


# --- details -----------------------------------------------------------------------------


def _jsonable(value: Any, depth: int = 0) -> Any:
    """Plain JSON that every backend stores and returns unchanged (jsonb refuses NUL and NaN)."""
    if depth > 32:
        return "…"
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        return {_text(str(k)): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return _text(str(value))  # UUID, Decimal, enums, ...


def _text(value: str) -> str:
    # PostgreSQL stores neither NUL nor lone surrogates, in text or in jsonb.
    try:
        value.encode()
    except UnicodeEncodeError:
        value = value.encode(errors="replace").decode()
    return value.replace("\x00", "")


def _shorten_strings(value: Any, limit: int) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"…[{len(value) - limit} more characters]"
    if isinstance(value, dict):
        return {k: _shorten_strings(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_shorten_strings(v, limit) for v in value]
    return value


def _size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def clean_details(details: Any) -> dict:
    """Details as stored: plain JSON, masked, at most DETAILS_MAX_BYTES (shortened with a marker)."""
    if details is None:
        details = {}
    elif not isinstance(details, dict):
        details = {"value": details}
    # Masked before they are capped, so truncation never cuts a secret the masker would catch.
    details = _jsonable(mask_data(_jsonable(details)))
    if not isinstance(details, dict):
        details = {"value": details}
    size = _size(details)
    if size <= DETAILS_MAX_BYTES:
        return details
    shortened = _shorten_strings(details, DETAILS_MAX_STRING)
    shortened["_truncated"] = {"original_bytes": size}
    if _size(shortened) <= DETAILS_MAX_BYTES:
        return shortened
    text = json.dumps(shortened, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    preview = text[: DETAILS_MAX_BYTES // 2]
    while len(preview.encode()) > DETAILS_MAX_BYTES // 2:
        preview = preview[: len(preview) // 2]
    return {"_truncated": {"original_bytes": size}, "preview": preview}


def _clip(name: str, value: str | None) -> str:
    text = _text(value or "")
    limit = _MAX_LENGTHS.get(name)
    return text[:limit] if limit else text


def _clean_ip(value: str | None) -> str | None:
    if not value:
        return None
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    return clean_ipv6_address(str(address)) if address.version == 6 else str(address)


# --- appending ---------------------------------------------------------------------------


def _sequenced() -> bool:
    """Whether appends leave chaining to the sequencer (PostgreSQL) or chain at once (SQLite)."""
    return connection.vendor == "postgresql"


def audit_chain_lock(*, wait: bool = True) -> bool:
    """Take the sequencer's lock for the rest of the transaction (PostgreSQL; SQLite's IMMEDIATE
    transactions already serialize writers). With `wait=False`, True only if it was free.
    Appends do not take it: no transaction outside the sequencer needs it, for order or else."""
    if connection.vendor != "postgresql":
        return True
    with connection.cursor() as cursor:
        if wait:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [AUDIT_CHAIN_LOCK])
            return True
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [AUDIT_CHAIN_LOCK])
        return bool(cursor.fetchone()[0])


def _head() -> tuple[int, str]:
    with connection.cursor() as cursor:
        cursor.execute(_HEAD_SQL)
        row = cursor.fetchone()
    return (row[0], row[1]) if row else (0, GENESIS_HASH)


def audit_head() -> str:
    """The hash of the newest chained entry (GENESIS_HASH for an empty chain)."""
    return _head()[1]


# The append is on the request path (one per served request), so it skips the ORM's per-save
# machinery: one INSERT (on SQLite also one indexed read of the head), values prepared by the
# model's own fields (get_db_prep_save), so they are stored exactly as the ORM would store them.
_TABLE = AuditLog._meta.db_table
_HEAD_SQL = f"SELECT seq, hash FROM {_TABLE} WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1"
_COLUMNS = ("timestamp", "actor", "action", "target", "request_id", "client_ip", "outcome", "details", "seq",
            "prev_hash", "hash")
_FIELDS = [AuditLog._meta.get_field(name) for name in _COLUMNS]
_INSERT_SQL = (f"INSERT INTO {_TABLE} ({', '.join(f.column for f in _FIELDS)}) "
               f"VALUES ({', '.join(['%s'] * len(_FIELDS))})")
_CONTENT = ("id", "timestamp", "actor", "action", "target", "request_id", "client_ip", "outcome", "details")
_CHAIN_SQL = f"UPDATE {_TABLE} SET seq = %s, prev_hash = %s, hash = %s WHERE id = %s AND seq IS NULL"


def _insert(entry: AuditLog) -> None:
    params = [field.get_db_prep_save(getattr(entry, field.attname), connection) for field in _FIELDS]
    with connection.cursor() as cursor:
        if connection.features.can_return_columns_from_insert:
            cursor.execute(_INSERT_SQL + " RETURNING id", params)
            entry.pk = cursor.fetchone()[0]
        else:
            cursor.execute(_INSERT_SQL, params)
            entry.pk = cursor.lastrowid
    entry._state.adding = False
    entry._state.db = connection.alias


def _hash_of(prev_hash: str, timestamp, actor, action, target, request_id, client_ip, outcome, details) -> str:
    return entry_hash(prev_hash=prev_hash, timestamp=timestamp, actor=actor, action=action, target=target,
                      request_id=request_id, client_ip=client_ip, outcome=outcome, details=details)


def audit_record(*, actor: str, action: str, target: str = "", outcome: str = "success", details: dict | None = None,
                 request_id: str = "", client_ip: str | None = None) -> AuditLog:
    """Append one entry (sync; call inside the transaction of the change it records). On
    PostgreSQL it is chained by the sequencer once committed: seq, prev_hash and hash are None
    on the returned entry."""
    if outcome not in AuditLog.Outcome.values:
        raise ValueError(f"outcome must be one of {AuditLog.Outcome.values}, not {outcome!r}")
    entry = AuditLog(
        actor=_clip("actor", actor) or "system",
        action=_clip("action", action),
        target=_clip("target", target),
        request_id=_clip("request_id", request_id),
        client_ip=_clean_ip(client_ip),
        outcome=outcome,
        details=clean_details(details),
    )
    # No savepoint of its own: if the insert fails, the change it records must roll back too.
    with transaction.atomic(savepoint=False):
        entry.timestamp = timezone.now()
        if not _sequenced():
            # SQLite: this transaction holds the database's write lock; chain at once.
            seq, entry.prev_hash = _head()
            entry.seq = seq + 1
            entry.hash = _hash_of(entry.prev_hash, entry.timestamp, entry.actor, entry.action, entry.target,
                                  entry.request_id, entry.client_ip, entry.outcome, entry.details)
        _insert(entry)
    return entry


def audit_chain_sequence(*, limit: int = SEQUENCE_BATCH, wait: bool = False) -> int:
    """Chain up to `limit` committed unchained entries (the sequencer's step; sync, in a
    transaction of its own). Returns how many; 0 when there were none, or when another
    sequencer holds the lock and `wait` is False."""
    with transaction.atomic():
        if not audit_chain_lock(wait=wait):
            return 0
        seq, prev_hash = _head()
        # Read as verification reads them (values_list: the same conversions from the database).
        rows = list(AuditLog.objects.filter(seq__isnull=True).order_by("id").values_list(*_CONTENT)[:limit])
        if not rows:
            return 0
        updates = []
        for values in rows:
            seq += 1
            hash_ = _hash_of(prev_hash, *values[1:])
            updates.append((seq, prev_hash, hash_, values[0]))
            prev_hash = hash_
        with connection.cursor() as cursor:
            cursor.executemany(_CHAIN_SQL, updates)
    logger.info("audit chain head seq=%d hash=%s (%d entries chained)", seq, prev_hash, len(updates))
    return len(updates)


def audit_chain_sequence_all() -> int:
    """Chain every entry committed so far, waiting for a running sequencer (verification,
    tests, the beat backstop). Returns how many were chained."""
    total = 0
    while True:
        done = audit_chain_sequence(wait=True)
        total += done
        if done < SEQUENCE_BATCH:
            return total


def _refuse_save(sender, instance: AuditLog, **kwargs: Any) -> None:
    # audit_record appends with its own INSERT; every ORM save is an edit or a forged entry.
    raise AuditLogAppendOnly()


def _refuse_delete(sender, instance: AuditLog, **kwargs: Any) -> None:
    raise AuditLogAppendOnly()


pre_save.connect(_refuse_save, sender=AuditLog, dispatch_uid="governance.audit.refuse_save")
pre_delete.connect(_refuse_delete, sender=AuditLog, dispatch_uid="governance.audit.refuse_delete")


# --- who made a change -------------------------------------------------------------------


_actor: contextvars.ContextVar[str | None] = contextvars.ContextVar("audit_actor", default=None)


@contextlib.contextmanager
def audit_actor(actor: str) -> Iterator[None]:
    """Name the actor ("user:<name>", "key:<prefix>") of the changes made inside the block."""
    token = _actor.set(actor)
    try:
        yield
    finally:
        _actor.reset(token)


def current_actor() -> str:
    """The actor set by audit_actor, or "system"."""
    return _actor.get() or "system"


def user_actor(user: Any) -> str:
    return f"user:{user.get_username()}"


class AuditedAdminMixin:
    """A ModelAdmin mixin: changes made from its pages are audited with the staff user as actor.

    Covers the add/change form (with inlines), delete, and the changelist (actions, list_editable).
    """

    def _as_user(self, request: HttpRequest, view: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with audit_actor(user_actor(request.user)):
            return view(request, *args, **kwargs)

    def changeform_view(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        return self._as_user(request, super().changeform_view, *args, **kwargs)  # type: ignore[misc]

    def delete_view(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        return self._as_user(request, super().delete_view, *args, **kwargs)  # type: ignore[misc]

    def changelist_view(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        return self._as_user(request, super().changelist_view, *args, **kwargs)  # type: ignore[misc]

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        with audit_actor(user_actor(request.user)):
            super().save_model(request, obj, form, change)  # type: ignore[misc]

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        with audit_actor(user_actor(request.user)):
            super().delete_model(request, obj)  # type: ignore[misc]

    def delete_queryset(self, request: HttpRequest, queryset: Any) -> None:
        with audit_actor(user_actor(request.user)):
            super().delete_queryset(request, queryset)  # type: ignore[misc]


# --- the pipeline stage ------------------------------------------------------------------


_SERVED_OUTCOMES = {"succeeded": AuditLog.Outcome.SUCCESS, "failed": AuditLog.Outcome.ERROR,
                    # Cancelled (the client went away): not a success; details.status tells it apart.
                    "cancelled": AuditLog.Outcome.ERROR, "running": AuditLog.Outcome.ERROR}


def turn_actor(turn: ChatTurn) -> str:
    """How audit entries name a turn's caller (sync: may read the staff user's name)."""
    if turn.principal is not None:
        return turn.principal.actor
    if turn.user_id is not None:
        from django.contrib.auth import get_user_model

        User = get_user_model()
        name = User._default_manager.filter(pk=turn.user_id).values_list(User.USERNAME_FIELD, flat=True).first()
        return f"user:{name if name is not None else turn.user_id}"
    return "system"


def _refusal_outcome(error: PlatformError) -> str:
    # Who may not do something is denied; what is over a limit or fails a guard is blocked.
    return AuditLog.Outcome.DENIED if error.http_status in (401, 403, 404) else AuditLog.Outcome.BLOCKED


class AuditStage:
    """Pipeline stage: a "request.served" entry with every stored run, "request.refused" for
    turns refused before the model was called."""

    def persist(self, turn: ChatTurn) -> None:
        run = turn.run
        assert run is not None
        details = {
            "status": turn.status,
            "transport": turn.transport,
            "stream": turn.stream,
            "model": run.model,
            "prompt_tokens": run.usage.prompt_tokens,
            "completion_tokens": run.usage.completion_tokens,
            "total_tokens": run.usage.total_tokens,
            "latency_ms": turn.latency_ms,
            "session_id": str(turn.session_id) if turn.session_id else None,
            "run_id": str(turn.run_id),
        }
        if turn.variant:
            details["experiment_id"], details["variant"] = turn.experiment_id, turn.variant
        if run.error is not None:
            details["error_code"] = run.error.code
        if turn.store_error:
            details["store_error"] = turn.store_error
        audit_record(actor=turn_actor(turn), action="request.served", target=f"agent:{turn.agent.name}",
                     outcome=_SERVED_OUTCOMES.get(turn.status, AuditLog.Outcome.ERROR), details=details,
                     request_id=turn.request_id or "", client_ip=turn.client_ip)

    async def refused(self, turn: ChatTurn, error: PlatformError) -> None:
        def record() -> None:
            audit_record(actor=turn_actor(turn), action="request.refused", target=f"agent:{turn.agent.name}",
                         outcome=_refusal_outcome(error),
                         details={"code": error.code, "status": error.http_status, "transport": turn.transport},
                         request_id=turn.request_id or "", client_ip=turn.client_ip)

        try:
            await write_db(record)
        except Exception:
            # The caller must still get the refusal itself, not an audit failure.
            logger.exception("Could not audit the refusal of request %s", turn.request_id)


# --- verification ------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainBreak:
    id: int
    problem: str  # "hash_mismatch", "prev_hash_mismatch" or "gap"
    message: str


@dataclass(frozen=True)
class ChainReport:
    count: int
    head: str | None
    broken: ChainBreak | None
    anchor_found: bool | None = None
    # Entries committed but not chained yet (PostgreSQL, between two sequencer runs).
    pending: int = 0

    @property
    def ok(self) -> bool:
        return self.broken is None and self.anchor_found is not False


_VERIFY_FIELDS = ("id", "seq", "prev_hash", "hash", "timestamp", "actor", "action", "target", "request_id",
                  "client_ip", "outcome", "details")


def audit_chain_verify(*, chunk_size: int = 2000, anchor: str | None = None,
                       progress: Callable[[int], None] | None = None, progress_every: int = 10_000) -> ChainReport:
    """Walk the chain in seq order and check every entry's hash and its link to the one before.

    Stops at the first broken entry. Places have no holes (1, 2, 3, ...), so a missing place is
    a removed entry, exactly. `anchor`: a head hash recorded earlier; the report says whether it
    is still in the chain (the newest entries cannot be removed unnoticed then). Entries not
    chained yet are counted in `pending` (run audit_chain_sequence_all() first to have none).
    """
    expected_prev = GENESIS_HASH
    prev_id: int | None = None
    prev_seq = 0
    count = 0
    anchor_found = False
    chained = AuditLog.objects.filter(seq__isnull=False).order_by("seq")
    rows = chained.values_list(*_VERIFY_FIELDS).iterator(chunk_size=chunk_size)
    for id_, seq, prev_hash, hash_, timestamp, actor, action, target, request_id, client_ip, outcome, details in rows:
        computed = entry_hash(prev_hash=prev_hash or "", timestamp=timestamp, actor=actor, action=action,
                              target=target, request_id=request_id, client_ip=client_ip, outcome=outcome,
                              details=details)
        broken = None
        if computed != hash_:
            broken = ChainBreak(id_, "hash_mismatch",
                                f"entry {id_}: hash mismatch, its stored hash does not match its contents "
                                "(the entry was altered)")
        elif seq != prev_seq + 1:
            if prev_id is None:
                broken = ChainBreak(id_, "gap", f"entry {id_}: gap, it is not the start of the chain "
                                                "(entries before it were removed)")
            else:
                broken = ChainBreak(id_, "gap", f"entry {id_}: gap, it does not follow entry {prev_id} "
                                                f"(entries between {prev_id} and {id_} were removed)")
        elif prev_hash != expected_prev:
            if prev_id is None:
                broken = ChainBreak(id_, "gap", f"entry {id_}: gap, its prev_hash does not link to the start of "
                                                "the chain (entries before it were removed)")
            else:
                broken = ChainBreak(id_, "prev_hash_mismatch",
                                    f"entry {id_}: prev_hash mismatch, it does not link to entry {prev_id} "
                                    f"(entry {prev_id} was replaced, or {id_} inserted out of order)")
        if broken is not None:
            return ChainReport(count=count, head=expected_prev if prev_id is not None else None, broken=broken,
                               anchor_found=None if anchor is None else anchor_found)
        count += 1
        expected_prev, prev_id, prev_seq = hash_, id_, seq
        anchor_found = anchor_found or hash_ == anchor
        if progress is not None and count % progress_every == 0:
            progress(count)
    return ChainReport(count=count, head=expected_prev if prev_id is not None else None, broken=None,
                       anchor_found=None if anchor is None else anchor_found,
                       pending=AuditLog.objects.filter(seq__isnull=True).count())


# Configuration-change receivers (agents, skills, feature flags).
from . import audit_signals  # noqa: E402,F401
