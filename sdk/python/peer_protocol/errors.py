"""The one exception type the SDK raises for API failures."""

from typing import Optional


class PeerError(Exception):
    """An error answered by the node (or the failure to reach it).

    Attributes:
        status: the HTTP status (``None`` if the node could not be reached).
        code: the API's stable error code, e.g. ``"NOT_CONNECTED"``, ``"RATE_LIMITED"``;
            ``"CONNECTION_FAILED"`` when the node could not be reached; ``None`` when the
            node answered an error without a JSON body (e.g. ``404`` for a route this
            node does not have, ``405`` for a wrong method).
        message: the human-readable message.
        retry_after_ms: how long to wait before retrying, when the node said so (the
            ``retry_after_ms`` field, else the ``Retry-After`` header); otherwise ``None``.
    """

    def __init__(
        self,
        status: Optional[int],
        code: Optional[str],
        message: str,
        retry_after_ms: Optional[int] = None,
    ) -> None:
        super().__init__(status, code, message, retry_after_ms)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms

    def __str__(self) -> str:
        where = "no answer" if self.status is None else "HTTP %d" % self.status
        text = "%s: %s (%s)" % (self.code or "ERROR", self.message, where)
        if self.retry_after_ms is not None:
            text += ", retry after %d ms" % self.retry_after_ms
        return text

    def __repr__(self) -> str:
        return "PeerError(status=%r, code=%r, message=%r, retry_after_ms=%r)" % (
            self.status,
            self.code,
            self.message,
            self.retry_after_ms,
        )
