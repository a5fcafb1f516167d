"""Audit log pages: fully read-only, for superusers too (as healthchecks' hc/logs/admin.py).

Nobody adds, changes or deletes an entry here: entries come from governance.audit.audit_record
only, and the model and (on PostgreSQL) a trigger refuse changes anyway. A big table: the
changelist skips the full count and searches exact or prefix values.
"""

from __future__ import annotations

import json

from django.contrib import admin
from django.utils.html import format_html

from agentplatform.admin_mixins import ReadOnlyAdminMixin

from ..models import AuditLog


@admin.register(AuditLog)
class AuditLogAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["timestamp", "actor", "action", "target", "outcome", "request_id", "client_ip"]
    list_filter = ["action", "outcome", "timestamp"]
    search_fields = ["=request_id", "^actor", "^target"]
    show_full_result_count = False
    list_per_page = 100
    ordering = ["-id"]
    actions = None
    fields = ["id", "timestamp", "actor", "action", "target", "outcome", "request_id", "client_ip",
              "details_pretty", "seq", "prev_hash", "hash"]
    readonly_fields = fields

    @admin.display(description="Details")
    def details_pretty(self, obj: AuditLog) -> str:
        if not obj.details:
            return "—"
        return format_html('<pre style="margin: 0; white-space: pre-wrap">{}</pre>',
                           json.dumps(obj.details, indent=2, ensure_ascii=False, sort_keys=True))
