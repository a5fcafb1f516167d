"""Governance routes under /api/v1/ (keys admin API, flags). Each area adds its paths to its
own list here when its views exist."""

from django.urls import path

from . import views_flags, views_keys

key_urlpatterns: list = [
    path("admin/api-keys", views_keys.ApiKeyListView.as_view(), name="admin-api-key-list"),
    path("admin/api-keys/<str:prefix>", views_keys.ApiKeyDetailView.as_view(), name="admin-api-key-detail"),
    path("admin/api-keys/<str:prefix>/rotate", views_keys.ApiKeyRotateView.as_view(), name="admin-api-key-rotate"),
    path("admin/api-keys/<str:prefix>/revoke", views_keys.ApiKeyRevokeView.as_view(), name="admin-api-key-revoke"),
]
flag_urlpatterns: list = [
    path("flags", views_flags.FlagListView.as_view(), name="flag-list"),
]

urlpatterns = key_urlpatterns + flag_urlpatterns
