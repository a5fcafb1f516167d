"""Admin REST API for API keys (filled in by the keys work)."""
