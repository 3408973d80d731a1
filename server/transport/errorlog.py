"""One log line per failed request, throttled so a flood of failures cannot flood the log.

Plain client mistakes (bad input, unknown model, cancelled calls) are DEBUG. Everything else is a
WARNING (overload, deadlines, shutting down) or an ERROR (inference or server faults), carrying the
request id and model. At most one line per (model, code) per interval is written, at any level
(a flood of bad requests at DEBUG is a flood too); the next line says how many were left out.
Under overload or a broken model, a line per request would cost the event loop time exactly
when it has none, and bury the first, most useful line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from mobiserve.server.errors import shown

CLIENT_MISTAKES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED})
SERVER_FAULTS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})


@dataclass
class _Window:
    opened: float
    suppressed: int = 0


class ErrorLog:
    def __init__(self, logger: logging.Logger, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self._log = logger
        self._interval_s = interval_s
        self._clock = clock
        self._windows: dict[tuple[str, grpc.StatusCode], _Window] = {}  # model labels are bounded

    def failed(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        model: str,
        method: str,
        request_id: str,
        exc: BaseException | None = None,
    ) -> None:
        """Log one failed request (exc: a traceback to attach, for unexpected errors)."""
        if code in CLIENT_MISTAKES:
            level = logging.DEBUG
        else:
            level = logging.ERROR if code in SERVER_FAULTS else logging.WARNING
        if not self._log.isEnabledFor(level):
            return
        now = self._clock()
        window = self._windows.get((model, code))
        if window is not None and now - window.opened < self._interval_s:
            window.suppressed += 1
            return
        suppressed = window.suppressed if window is not None else 0
        self._windows[(model, code)] = _Window(now)
        if suppressed:
            message = f"{message} (and {suppressed} more like it since the last line)"
        self._log.log(
            level,
            "event=request_failed model=%s method=%s code=%s request_id=%s message=%r",
            model,
            method,
            code.name,
            shown(request_id),
            message,
            exc_info=exc,
        )
