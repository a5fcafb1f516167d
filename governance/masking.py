"""PII and secret masking (filled in by the masking work)."""

import logging


def mask_text(text: str) -> str:
    return text


def mask_data(value):
    return value


class MaskingFilter(logging.Filter):
    """Masks log records' messages and arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        return True
