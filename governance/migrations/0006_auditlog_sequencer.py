"""The audit chain's sequencer (governance.audit): entries get a place `seq` in the chain, and
on PostgreSQL are appended without seq, prev_hash and hash, which the sequencer sets later.

* seq for the existing entries: they were chained in id order (each append read the head by
  id under the chain's lock), so their places are their ranks by id.
* The PostgreSQL trigger (0003) refused every UPDATE; it now lets through exactly the
  sequencer's update: an unchained entry (seq, prev_hash and hash empty) gets all three, and
  every other column stays as it is. Everything else is refused as before.
"""

from django.db import migrations, models

TABLE = "governance_auditlog"
TRIGGER = "governance_auditlog_append_only"
CONTENT = ("id", "timestamp", "actor", "action", "target", "request_id", "client_ip", "outcome", "details")

SEQUENCER_FUNCTION = """
CREATE OR REPLACE FUNCTION governance_auditlog_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND OLD.seq IS NULL AND OLD.prev_hash IS NULL AND OLD.hash IS NULL
       AND NEW.seq IS NOT NULL AND NEW.prev_hash IS NOT NULL AND NEW.hash IS NOT NULL
       AND %s THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'governance_auditlog is append-only: % of entry % refused', TG_OP, OLD.id
        USING ERRCODE = 'restrict_violation';
END;
$$
""".replace("%s", " AND ".join(f"NEW.{c} IS NOT DISTINCT FROM OLD.{c}" for c in CONTENT), 1)

REFUSE_FUNCTION = """
CREATE OR REPLACE FUNCTION governance_auditlog_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'governance_auditlog is append-only: % of entry % refused', TG_OP, OLD.id
        USING ERRCODE = 'restrict_violation';
END;
$$
"""

NUMBER_EXISTING = f"""
UPDATE {TABLE} SET seq = ranked.n
FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY id) AS n FROM {TABLE}) AS ranked
WHERE {TABLE}.id = ranked.id
"""


def forwards(apps, schema_editor):
    postgres = schema_editor.connection.vendor == "postgresql"
    if postgres:
        schema_editor.execute(f"ALTER TABLE {TABLE} DISABLE TRIGGER {TRIGGER}")
    schema_editor.execute(NUMBER_EXISTING)
    if postgres:
        schema_editor.execute(f"ALTER TABLE {TABLE} ENABLE TRIGGER {TRIGGER}")
        schema_editor.execute(SEQUENCER_FUNCTION, params=None)  # None: the % are not placeholders


def backwards(apps, schema_editor):
    # prev_hash and hash become NOT NULL again: chain what is pending first (the live
    # sequencer: the columns it uses are all still there at this point). Where late commits
    # were chained out of id order, the previous code's verification (by id) reports them.
    from governance.audit import audit_chain_sequence_all

    audit_chain_sequence_all()
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(REFUSE_FUNCTION, params=None)


class Migration(migrations.Migration):

    dependencies = [
        ('governance', '0005_apikey_scopes_from_links'),
    ]

    operations = [
        migrations.AddField(
            model_name='auditlog',
            name='seq',
            field=models.BigIntegerField(blank=True, editable=False, null=True, unique=True),
        ),
        migrations.AlterField(
            model_name='auditlog',
            name='hash',
            field=models.CharField(blank=True, editable=False, max_length=64, null=True, unique=True),
        ),
        migrations.AlterField(
            model_name='auditlog',
            name='prev_hash',
            field=models.CharField(blank=True, editable=False, max_length=64, null=True),
        ),
        migrations.RunPython(forwards, backwards),
        migrations.AddIndex(
            model_name='auditlog',
            index=models.Index(condition=models.Q(('seq__isnull', True)), fields=['id'], name='auditlog_unchained'),
        ),
    ]
