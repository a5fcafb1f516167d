from django.db import migrations, models
from django.db.models import Min


def mark_run_starts(apps, schema_editor):
    """Each run's first usage record (lowest id) starts it: one UPDATE ... WHERE id IN (SELECT
    MIN(id) ... GROUP BY run_id), the rule billing.rollups counted requests by until now."""
    UsageRecord = apps.get_model("billing", "UsageRecord")
    db = schema_editor.connection.alias
    firsts = (UsageRecord.objects.using(db).filter(run_id__isnull=False).order_by()
              .values("run_id").annotate(first=Min("id")).values("first"))
    UsageRecord.objects.using(db).filter(id__in=firsts).update(starts_run=True)


class Migration(migrations.Migration):

    dependencies = [
        ('billing', '0003_alerts_rollups'),
    ]

    operations = [
        migrations.AddField(
            model_name='usagerecord',
            name='starts_run',
            field=models.BooleanField(default=False),
        ),
        migrations.AlterField(
            model_name='usagerollup',
            name='requests',
            field=models.PositiveIntegerField(default=0, help_text='Runs whose first usage record falls in this row.'),
        ),
        migrations.RunPython(mark_run_starts, migrations.RunPython.noop),
    ]
