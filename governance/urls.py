"""Governance routes under /api/v1/ (keys admin API, flags). Each area adds its paths to its
own list here when its views exist."""

key_urlpatterns: list = []
flag_urlpatterns: list = []

urlpatterns = key_urlpatterns + flag_urlpatterns
