"""Server-Sent Events: an incremental parser and a resuming event stream.

The parser follows the WHATWG rules (lines end in CRLF, LF or CR; ``:`` starts a
comment; ``field: value`` with one optional space after the colon; ``data`` lines join
with ``\\n``; an empty line dispatches). :class:`EventStream` reads ``GET /v1/events``,
remembers the last event id it saw, and after a disconnect reconnects with
``Last-Event-ID`` (with a backoff), so durable events are neither lost nor repeated.
"""

import http.client
import json
import random
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional

from .errors import PeerError

if TYPE_CHECKING:  # pragma: no cover
    from .client import Client


class Event:
    """One event of ``/v1/events``.

    Attributes:
        id: the SSE ``id:`` as an ``int`` for durable events (``message``,
            ``task_update``), ``None`` for ephemeral ones (or an id that is not a number,
            kept as ``raw_id``).
        type: the ``"type"`` field of the JSON data (``None`` if the data is not an object).
        data: the parsed JSON data (a ``dict`` for this node's events).
        event: the SSE ``event:`` name (``"message"`` when absent, as in browsers).
        raw: the data text as received (``data:`` lines joined with ``\\n``).
        raw_id: the ``id:`` text, or ``None``.
    """

    __slots__ = ("id", "type", "data", "event", "raw", "raw_id")

    def __init__(self, raw: str, event: str = "message", raw_id: Optional[str] = None) -> None:
        self.raw = raw
        self.event = event
        self.raw_id = raw_id
        self.id = _as_int(raw_id)
        try:
            self.data = json.loads(raw)  # type: Any
        except ValueError:
            self.data = raw
        self.type = self.data.get("type") if isinstance(self.data, dict) else None
        if self.id is None and isinstance(self.data, dict):
            # Durable events also carry their id inside the data.
            self.id = _as_int(self.data.get("event_id"))

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default) if isinstance(self.data, dict) else default

    def __repr__(self) -> str:
        return "Event(id=%r, type=%r, data=%r)" % (self.id, self.type, self.data)


def _as_int(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isdigit() and value.isascii():
        return int(value)
    return None


class SSEParser:
    """Incremental SSE parser: :meth:`feed` bytes, get back complete :class:`Event` s.

    ``last_event_id`` follows the spec: it is set by an ``id:`` field when its event is
    dispatched (also for an event without data), and kept across events.
    ``retry_ms`` is the last valid ``retry:`` field, if any.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf already known to hold no line end
        self._skip_lf = False  # the previous chunk ended in CR: a leading LF belongs to it
        self._data = []  # type: List[str]
        self._event = ""
        self._id = None  # type: Optional[str]  # id buffer of the event being read
        self.last_event_id = None  # type: Optional[str]
        self.retry_ms = None  # type: Optional[int]
        self.comments = 0

    def feed(self, chunk: bytes) -> List[Event]:
        out = []  # type: List[Event]
        if not chunk:
            return out
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buf = self._buf
        buf += chunk
        start = 0
        n = len(buf)
        i = self._scan
        while True:
            cr = buf.find(b"\r", i)
            lf = buf.find(b"\n", i)
            if cr < 0 and lf < 0:
                break
            if cr < 0 or (0 <= lf < cr):
                end, nxt = lf, lf + 1
            elif cr + 1 < n:
                end, nxt = cr, cr + 2 if buf[cr + 1] == 0x0A else cr + 1
            else:  # CR at the very end: the line is complete, an LF may follow
                end, nxt = cr, cr + 1
                self._skip_lf = True
            line = bytes(buf[start:end]).decode("utf-8", "replace")
            ev = self._line(line)
            if ev is not None:
                out.append(ev)
            start = i = nxt
        if start:
            del buf[:start]
        self._scan = len(buf)
        return out

    def _line(self, line: str) -> Optional[Event]:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id":
            if "\0" not in value:
                self._id = value
        elif field == "retry":
            if value.isdigit() and value.isascii():
                self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Optional[Event]:
        if self._id is not None:
            self.last_event_id = self._id if self._id != "" else None
        raw_id, self._id = self._id, None
        data, self._data = self._data, []
        name, self._event = self._event, ""
        if not data:
            return None
        return Event("\n".join(data), name or "message", raw_id if raw_id else None)


class EventStream:
    """Iterator over a node's ``/v1/events`` that survives disconnects.

    Use as ``for event in client.events(): ...`` (or as a context manager). Each
    connection sends ``Last-Event-ID`` with the last id seen, so after a drop the node
    starts after it (durable events are stored; ephemeral ones in the gap are lost).
    Durable events with an id not above the last one are skipped (no repeats).

    With ``auto_ack=True`` a durable event is acknowledged (``POST /v1/inbox/ack``)
    once it has been handled, i.e. when the loop asks for the next event (or on
    :meth:`close`), so an event whose handling crashed the program is delivered again.
    """

    def __init__(
        self,
        client: "Client",
        last_event_id: Optional[int] = None,
        auto_ack: bool = False,
        reconnect: bool = True,
        backoff_initial: float = 0.25,
        backoff_max: float = 10.0,
        read_timeout: float = 45.0,
        max_retries: Optional[int] = None,
        resync_on_lag: bool = True,
    ) -> None:
        self.client = client
        self.last_event_id = last_event_id
        self.auto_ack = auto_ack
        self.reconnect = reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.read_timeout = read_timeout
        self.max_retries = max_retries
        self.resync_on_lag = resync_on_lag
        self.connects = 0  # successful connections so far
        self.acked = None  # type: Optional[int]  # highest id acknowledged
        self._to_ack = None  # type: Optional[int]
        self._lock = threading.Lock()
        self._conn = None  # type: Any
        self._closed = False
        self._connected = threading.Event()
        self._iter = None  # type: Optional[Iterator[Event]]
        self._ready = None  # type: Any  # a response opened by connect(), not yet read
        self._last_yielded = None  # type: Optional[int]
        self._reading = False  # inside the read loop (which closes the connection itself)

    # -- public ----------------------------------------------------------

    def __iter__(self) -> "EventStream":
        return self

    def __next__(self) -> Event:
        if self._iter is None:
            self._iter = self._events()
        return next(self._iter)

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        """Waits until a connection's headers arrived (the node has subscribed us)."""
        return self._connected.wait(timeout)

    def connect(self) -> None:
        """Opens the connection now (instead of on the first ``next``)."""
        if self._conn is None and self._ready is None:
            self._ready = self._open()

    def ack(self, up_to: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Acknowledges durable events up to ``up_to`` (default: the last one seen)."""
        up_to = self.last_event_id if up_to is None else up_to
        if up_to is None:
            return None
        answer = self.client.ack(up_to)
        self.acked = up_to if self.acked is None else max(self.acked, up_to)
        return answer

    def close(self, ack_last: bool = False) -> None:
        """Stops the stream; safe to call from another thread (wakes a blocked read).

        Pending acknowledgements are sent. The event the loop is handling (the last one
        returned) is acknowledged only with ``ack_last=True``: with ``auto_ack`` it is
        otherwise acknowledged when the loop asks for the next event."""
        self._closed = True
        if ack_last and self._last_yielded is not None:
            with self._lock:
                if self._to_ack is None or self._to_ack < self._last_yielded:
                    self._to_ack = self._last_yielded
        self._flush_ack(quiet=True)
        if self._reading:
            # the reading thread (or the code this call interrupts, e.g. from a signal
            # handler) closes the connection itself; waking it is enough
            self._shutdown()
        else:
            self._drop()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- internals -------------------------------------------------------

    def _flush_ack(self, quiet: bool) -> None:
        with self._lock:
            up_to, self._to_ack = self._to_ack, None
        if up_to is None:
            return
        try:
            self.ack(up_to)
        except (PeerError, OSError):
            if not quiet:
                with self._lock:  # try again after the next event
                    if self._to_ack is None or self._to_ack < up_to:
                        self._to_ack = up_to
            # On close there is no later chance: the node delivers it again next time.

    def _shutdown(self) -> None:
        conn = self._conn
        sock = getattr(conn, "sock", None) if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _drop(self) -> None:
        self._shutdown()
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.close()
        except (OSError, RuntimeError):
            pass

    def _open(self) -> Any:
        """The response of a new connection, or None if the stream was closed."""
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = str(self.last_event_id)
        conn = self.client._connection(timeout=self.read_timeout)
        with self._lock:
            if self._closed:
                conn.close()
                return None
            self._conn = conn
        try:
            conn.request("GET", self.client._path("/v1/events"), headers=self.client._headers(headers))
            resp = conn.getresponse()
        except OSError as e:
            self._drop()
            raise PeerError(None, "CONNECTION_FAILED", "GET /v1/events: %s" % e) from e
        if resp.status != 200:
            body = resp.read()
            self._drop()
            raise self.client._error(resp.status, resp.getheader("Retry-After"), body)
        self.connects += 1
        self._connected.set()
        return resp

    def _events(self) -> Iterator[Event]:
        failures = 0
        while not self._closed:
            parser = SSEParser()
            try:
                resp = self._ready if self._ready is not None else self._open()
                self._ready = None
            except PeerError as e:
                if not self._retryable(e) or not self.reconnect or self._closed:
                    raise
                failures += 1
                if self.max_retries is not None and failures > self.max_retries:
                    raise
                self._sleep(self._delay(failures, None, e.retry_after_ms))
                continue
            if resp is None:
                return
            got_any = False
            lagged = False
            self._reading = True
            try:
                read = getattr(resp, "read1", None) or resp.read
                while not self._closed:
                    chunk = read(65536)
                    if not chunk:
                        break
                    for ev in parser.feed(chunk):
                        got_any = True
                        if ev.id is not None:
                            if self.last_event_id is not None and ev.id <= self.last_event_id:
                                continue  # already delivered before a reconnect
                            self.last_event_id = ev.id
                        self._last_yielded = ev.id
                        yield ev
                        if self.auto_ack and ev.id is not None:
                            with self._lock:
                                self._to_ack = ev.id
                            self._flush_ack(quiet=False)
                        if ev.type == "lagged" and self.resync_on_lag and self.last_event_id is not None:
                            lagged = True
                            break
                    if lagged:
                        break
            except (OSError, ValueError, AttributeError, http.client.HTTPException):
                # socket errors, timeouts, a broken chunked body, a connection closed by
                # close() (http.client may raise ValueError/AttributeError then)
                if self._closed:
                    return
            finally:
                self._reading = False
                self._drop()
            if self._closed:
                return
            if not self.reconnect:
                return
            if got_any or lagged:
                failures = 0
            failures += 1
            if self.max_retries is not None and failures > self.max_retries:
                raise PeerError(None, "CONNECTION_FAILED", "event stream lost %d times in a row" % (failures - 1))
            if not lagged:
                self._sleep(self._delay(failures, parser.retry_ms, None))

    @staticmethod
    def _retryable(e: PeerError) -> bool:
        return e.status is None or e.status in (429, 502, 503, 504)

    def _delay(self, failures: int, retry_ms: Optional[int], retry_after_ms: Optional[int]) -> float:
        if retry_after_ms is not None:
            return retry_after_ms / 1000.0
        base = self.backoff_initial if retry_ms is None else retry_ms / 1000.0
        delay = min(self.backoff_max, base * (2 ** max(0, failures - 1)))
        return delay * (0.75 + random.random() * 0.5)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._closed:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.05))
