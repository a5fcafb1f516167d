"""Billing routes under /api/v1/. Each area adds its paths to its own list here."""

from django.urls import path

from . import views_budgets, views_prices, views_usage

price_urlpatterns: list = [
    path("admin/prices", views_prices.ModelPriceListView.as_view(), name="admin-price-list"),
]
usage_urlpatterns: list = [
    path("usage", views_usage.UsageView.as_view(), name="usage"),
]
budget_urlpatterns: list = [
    path("admin/budgets", views_budgets.AdminBudgetListView.as_view(), name="admin-budget-list"),
    path("admin/budgets/<int:budget_id>", views_budgets.AdminBudgetDetailView.as_view(), name="admin-budget-detail"),
    path("budgets", views_budgets.BudgetListView.as_view(), name="budget-list"),
]

urlpatterns = price_urlpatterns + usage_urlpatterns + budget_urlpatterns
