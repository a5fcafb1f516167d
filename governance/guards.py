"""Input guards: prompt-injection heuristic (filled in by the guards work)."""


class InputGuardStage:
    pass
