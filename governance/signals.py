"""Cache invalidation on save."""
