"""GET /api/v1/flags (filled in by the flags work)."""
