"""The registry's refusal type and the checks shared by its modules."""

from __future__ import annotations

from flowfleet.contract import is_valid_name


def artifact_path(name: str, number: int) -> str:
    """The registry-relative download path of a version (the API's artifact route)."""
    return f"/api/models/{name}/versions/{number}/artifact"


class BrokerRefused(RuntimeError):
    """The broker refused the registry's credentials when it first connected; the
    message names the broker and the identity, never the password."""


class RegistryError(Exception):
    """A refused request: HTTP ``status``, ``code``, message and offending ``field``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after: int | None = None  # seconds, sent as Retry-After (429)


def comma_list(value: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated form field."""
    return [item.strip() for item in value.split(",") if item.strip()]


def check_name(value: str, field: str, what: str) -> str:
    if not isinstance(value, str) or not is_valid_name(value):
        raise RegistryError(
            400,
            "invalid_parameter",
            f"{value!r} is not a valid {what} (1-64 of letters, digits, _ . -; starting "
            "with a letter or digit)",
            field,
        )
    return value
