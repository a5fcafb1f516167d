"""Sliding-window rate limits (filled in by the rate-limit work)."""


class RateLimitStage:
    pass
