"""The governance pages of the console, one module per area."""

from . import audit, flags, keys  # noqa: F401  (registration)
