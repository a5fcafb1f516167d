from django.contrib import admin

from .models import ModelPrice, UsageRecord


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    """Editable: a save drops the cached prices (billing.pricing signals), the next turn sees it."""

    list_display = ["model", "input_per_1m", "cached_input_per_1m", "output_per_1m", "effective_from", "source"]
    list_filter = ["source"]
    search_fields = ["model"]
    date_hierarchy = "effective_from"
    ordering = ["model", "-effective_from"]


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    """Read-only: records are written by the metering stage with the run they belong to."""

    list_display = ["created_at", "model", "agent", "api_key", "prompt_tokens", "completion_tokens", "cost_usd",
                    "estimated", "priced"]
    list_filter = ["estimated", "priced"]
    search_fields = ["model", "request_id", "api_key__prefix", "agent__name"]
    list_select_related = ["agent", "api_key"]
    raw_id_fields = ["run", "api_key", "agent"]
    show_full_result_count = False

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
