"""The audit log: append, hash chain, verification (filled in by the audit work)."""


def audit_record(*, actor: str, action: str, target: str = "", outcome: str = "success", details: dict | None = None,
                 request_id: str = "", client_ip: str | None = None) -> None:
    """Append one entry (sync; call inside the transaction of the change it records)."""


class AuditStage:
    pass
