"""Feature flag pages (filled in by the flags work)."""
