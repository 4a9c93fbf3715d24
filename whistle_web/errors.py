"""Domain errors raised by services; the console, API and workers translate them."""

from __future__ import annotations

from dataclasses import dataclass, field


class DomainError(Exception):
    """Base class for errors a caller can show to a person."""

    status = 400
    title = "Bad request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(DomainError):
    status = 404
    title = "Not found"


class InvalidState(DomainError):
    status = 409
    title = "Conflict"


class Conflict(DomainError):
    status = 409
    title = "Conflict"


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


class ValidationError(DomainError):
    status = 422
    title = "Validation failed"

    def __init__(self, errors: list[FieldError] | FieldError, detail: str | None = None) -> None:
        self.errors = [errors] if isinstance(errors, FieldError) else list(errors)
        super().__init__(detail or "; ".join(f"{e.field}: {e.message}" for e in self.errors))

    @classmethod
    def single(cls, field_name: str, message: str) -> ValidationError:
        return cls(FieldError(field_name, message))


@dataclass(frozen=True)
class Actor:
    """Who asked for a change, recorded in the audit log."""

    type: str  # "user" | "api_key" | "system"
    id: int | None
    label: str
    ip_address: str | None = field(default=None, compare=False)

    @classmethod
    def system(cls, label: str = "system") -> Actor:
        return cls("system", None, label)
