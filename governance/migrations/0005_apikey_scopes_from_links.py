"""Fill the explicit scope states from what an empty list meant until now.

Before 0004 a key with no agent links could call every agent and a key with allowed_skills []
could use every skill. Those keys get all_agents / all_skills; every other key stays restricted
to its links and names (0004 added both fields as False, the closed state, so a key is never
wider between the two migrations).

Going back is refused while some key is restricted to no agents or no skills: the old schema
would read that key as one for all of them.
"""

from django.db import migrations


def scopes_from_links(apps, schema_editor):
    ApiKey = apps.get_model("governance", "ApiKey")
    ApiKey.objects.filter(agents__isnull=True).update(all_agents=True)
    ApiKey.objects.filter(allowed_skills=[]).update(all_skills=True)


def links_from_scopes(apps, schema_editor):
    ApiKey = apps.get_model("governance", "ApiKey")
    widened = (ApiKey.objects.filter(all_agents=False, agents__isnull=True)
               | ApiKey.objects.filter(all_skills=False, allowed_skills=[]))
    prefixes = sorted(set(widened.values_list("prefix", flat=True)))
    if prefixes:
        raise RuntimeError(
            "Cannot unapply governance.0005: these API keys may call no agent or use no skill, which the "
            f"previous schema would read as all of them: {', '.join(prefixes)}. Revoke them or give them "
            "agents and skills first.")
    # Nothing to write back: the services clear the links (names) of a key for all agents
    # (skills), which is what the previous schema reads as "all"; a stray link only narrows it.


class Migration(migrations.Migration):

    dependencies = [
        ('governance', '0004_apikey_all_agents_all_skills'),
    ]

    operations = [
        migrations.RunPython(scopes_from_links, links_from_scopes),
    ]
