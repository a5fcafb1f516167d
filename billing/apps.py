from django.apps import AppConfig


class BillingConfig(AppConfig):
    """Prices, budgets, usage metering and cost reports (built out by the billing issue).

    Runs already carry their token counts (agents.Run); this app turns them into money.
    """

    name = "billing"
    verbose_name = "Billing"

    def ready(self) -> None:
        # Connects the signals that drop the cached prices when a ModelPrice changes.
        from . import pricing  # noqa: F401
