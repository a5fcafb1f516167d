"""Branding of the admin site, which is the platform's console.

Loaded by admin autodiscovery (agentplatform is an installed app), so nothing imports it.
"""

from django.contrib import admin

admin.site.site_header = "Agent Platform"
admin.site.site_title = "Agent Platform"
admin.site.index_title = "Console"
