"""Experiments routes under /api/v1/."""

from django.urls import path

from . import views

urlpatterns = [
    path("admin/experiments", views.AdminExperimentListView.as_view(), name="admin-experiment-list"),
    path("admin/experiments/<int:experiment_id>", views.AdminExperimentDetailView.as_view(),
         name="admin-experiment-detail"),
    path("admin/experiments/<int:experiment_id>/results", views.AdminExperimentResultsView.as_view(),
         name="admin-experiment-results"),
]
