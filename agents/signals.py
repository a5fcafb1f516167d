"""Cache invalidation on save (filled in below)."""
