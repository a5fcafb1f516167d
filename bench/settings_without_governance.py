"""The platform's settings minus the governance stages: the baseline of bench/pipeline_bench.py."""

from agentplatform.settings import *  # noqa: F401,F403

AGENT_PIPELINE_STAGES: list[str] = []
