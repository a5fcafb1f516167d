"""On PostgreSQL, a trigger rejecting UPDATE and DELETE on governance_auditlog.

The model refuses changes through the ORM (governance.audit); the trigger also stops
QuerySet.update(), raw SQL and other clients. TRUNCATE is left alone (test databases are
flushed with it); keep it, and ALTER TABLE, away from the application's database role.
SQLite has no such trigger here: verify_audit_log still detects an altered row.
"""

from django.db import migrations

CREATE = [
    """
    CREATE OR REPLACE FUNCTION governance_auditlog_append_only() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'governance_auditlog is append-only: % of entry % refused', TG_OP, OLD.id
            USING ERRCODE = 'restrict_violation';
    END;
    $$
    """,
    "DROP TRIGGER IF EXISTS governance_auditlog_append_only ON governance_auditlog",
    """
    CREATE TRIGGER governance_auditlog_append_only
        BEFORE UPDATE OR DELETE ON governance_auditlog
        FOR EACH ROW EXECUTE FUNCTION governance_auditlog_append_only()
    """,
]
DROP = [
    "DROP TRIGGER IF EXISTS governance_auditlog_append_only ON governance_auditlog",
    "DROP FUNCTION IF EXISTS governance_auditlog_append_only()",
]


def _run(statements):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor != "postgresql":
            return
        for sql in statements:
            schema_editor.execute(sql, params=None)  # None: the % in the function body is not a placeholder

    return run


class Migration(migrations.Migration):

    dependencies = [
        ("governance", "0002_keys_audit_idempotency_flags"),
    ]

    operations = [
        migrations.RunPython(_run(CREATE), _run(DROP)),
    ]
