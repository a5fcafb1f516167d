"""Billing models (ModelPrice, Budget, Usage) arrive with the billing issue; token counts
are recorded on agents.Run from the start so nothing needs backfilling."""
