"""Exceptions that carry their HTTP status, shared by the control API and the workers.

One handler turns any of them into ``{"error": message}`` with ``status``; messages are
for the end user and name the object they are about.
"""


class MserveError(Exception):
    """Base class: an error whose message is safe to show to the user."""

    status = 500

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def to_dict(self) -> dict:
        body = {"error": self.message}
        if self.hint:
            body["hint"] = self.hint
        return body


class BadRequest(MserveError):
    status = 400


class Unauthorized(MserveError):
    status = 401


class NotFound(MserveError):
    status = 404


class Conflict(MserveError):
    status = 409


class PayloadTooLarge(MserveError):
    status = 413


class Unavailable(MserveError):
    status = 503


class DeployFailed(MserveError):
    """The model could not be loaded or warmed up; nothing changed."""

    status = 422


ERRORS_BY_STATUS = {cls.status: cls for cls in (BadRequest, Unauthorized, NotFound, Conflict,
                                                PayloadTooLarge, Unavailable, DeployFailed)}


def error_for_status(status: int, message: str, hint: str | None = None) -> MserveError:
    """Rebuild the exception a server raised from its status and message (used by clients)."""
    cls = ERRORS_BY_STATUS.get(status, MserveError)
    err = cls(message, hint=hint)
    err.status = status
    return err
