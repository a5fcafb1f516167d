"""Feature flags: evaluation and the pipeline stage (filled in by the flags work)."""


class FeatureFlagStage:
    pass
