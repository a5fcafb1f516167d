"""Audit log pages: read-only (filled in by the audit work)."""
