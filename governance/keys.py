"""API-key usage on the request path: last_used_at, updated cheaply (filled in by the keys work)."""


class KeyUsageStage:
    pass
