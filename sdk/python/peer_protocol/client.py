"""A client of a Peer Protocol node's local HTTP API (standard library only)."""

import http.client
import json
import os
import queue
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Union
from urllib.parse import quote, urlencode, urlsplit

from .errors import PeerError
from .events import EventStream

#: Task states after which a task no longer changes.
TERMINAL_STATES = frozenset(["completed", "failed", "canceled", "rejected"])

JSON = Any


class Client:
    """Talks to one node's API.

    ``base_url`` is e.g. ``"http://127.0.0.1:7401"``; ``token`` the content of
    ``<data-dir>/api-token``. Every method makes one request on a new connection, so a
    client may be shared between threads. Failures raise :class:`PeerError`.
    """

    def __init__(self, base_url: str, token: Optional[str] = None, timeout: float = 60.0) -> None:
        if "://" not in base_url:
            base_url = "http://" + base_url
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("base_url must be http://HOST:PORT, got %r" % base_url)
        self.base_url = base_url.rstrip("/")
        self.token = token.strip() if token else None
        self.timeout = timeout
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")

    @classmethod
    def from_data_dir(cls, path: Union[str, "os.PathLike[str]"], timeout: float = 60.0) -> "Client":
        """A client of the node running on data directory ``path`` (reads ``api.addr``
        and ``api-token``, as the ``peer`` CLI does)."""
        path = os.fspath(path)
        addr_file = os.path.join(path, "api.addr")
        try:
            with open(addr_file, encoding="utf-8") as f:
                addr = f.read().strip()
        except FileNotFoundError:
            raise PeerError(
                None,
                "CONNECTION_FAILED",
                "no running node found for %s (%s is missing); start one with `peer run --data-dir %s`"
                % (path, addr_file, path),
            ) from None
        with open(os.path.join(path, "api-token"), encoding="utf-8") as f:
            token = f.read().strip()
        return cls("http://" + addr, token, timeout=timeout)

    def __repr__(self) -> str:
        return "Client(%r)" % self.base_url

    # -- plumbing ----------------------------------------------------------

    def _connection(self, timeout: Optional[float] = None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self.timeout if timeout is None else timeout)

    def _path(self, path: str) -> str:
        return self._prefix + path

    def _headers(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        headers = {"User-Agent": "peer-protocol-python/0.1"}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        if extra:
            headers.update(extra)
        return headers

    @staticmethod
    def _error(status: int, retry_after: Optional[str], body: bytes) -> PeerError:
        code = None  # type: Optional[str]
        message = ""
        retry_ms = None  # type: Optional[int]
        try:
            err = json.loads(body.decode("utf-8"))["error"]
            code = err.get("code")
            message = err.get("message") or ""
            if isinstance(err.get("retry_after_ms"), int):
                retry_ms = err["retry_after_ms"]
        except (ValueError, KeyError, TypeError, AttributeError):
            text = body.decode("utf-8", "replace").strip()
            reason = http.client.responses.get(status, "")
            message = text or "HTTP %d %s with no error body" % (status, reason)
            if status in (404, 405) and not text:
                message += " (this node may not have this route)"
        if retry_ms is None and retry_after and retry_after.strip().isdigit():
            retry_ms = int(retry_after.strip()) * 1000
        return PeerError(status, code, message, retry_ms)

    def request(
        self,
        method: str,
        path: str,
        body: Optional[JSON] = None,
        raw_body: Optional[bytes] = None,
        query: Optional[Dict[str, Any]] = None,
        parse: bool = True,
        timeout: Optional[float] = None,
    ) -> Any:
        """One API call. Answers the parsed JSON (or the text, with ``parse=False``)."""
        if query:
            q = {k: v for k, v in query.items() if v is not None}
            if q:
                path += "?" + urlencode(q)
        extra = {"Accept": "application/json"}
        if body is not None or raw_body is not None:
            if raw_body is None:
                raw_body = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            extra["Content-Type"] = "application/json"
        conn = self._connection(timeout)
        try:
            conn.request(method, self._path(path), body=raw_body, headers=self._headers(extra))
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise PeerError(None, "CONNECTION_FAILED", "%s %s: %s" % (method, path, e)) from e
        finally:
            conn.close()
        if not 200 <= resp.status < 300:
            raise self._error(resp.status, resp.getheader("Retry-After"), data)
        if not parse:
            return data.decode("utf-8", "replace")
        if not data:
            return None
        try:
            return json.loads(data.decode("utf-8"))
        except ValueError as e:
            raise PeerError(resp.status, "INVALID_RESPONSE", "%s %s answered non-JSON: %r" % (method, path, data[:200])) from e

    # -- node ------------------------------------------------------------

    def health(self) -> Dict[str, Any]:
        """``GET /v1/health``: status, entity_id, peer_id, listen_addrs, versions."""
        return self.request("GET", "/v1/health")

    def stats(self) -> Dict[str, Any]:
        """``GET /v1/stats``: message counters per peer."""
        return self.request("GET", "/v1/stats")

    def metrics(self) -> str:
        """``GET /metrics``: Prometheus metrics (OpenMetrics text)."""
        return self.request("GET", "/metrics", parse=False)

    # -- peers and messages ----------------------------------------------

    def peers(self) -> List[Dict[str, Any]]:
        """``GET /v1/peers``: connected and remembered peers."""
        return self.request("GET", "/v1/peers")

    def connect(self, addr: str) -> Dict[str, Any]:
        """``POST /v1/peers``: dials ``addr`` (a multiaddr); answers the peer."""
        return self.request("POST", "/v1/peers", {"addr": addr})

    def send(self, to: str, msg_type: str, payload: JSON = None, raw_payload: Optional[str] = None) -> Dict[str, Any]:
        """``POST /v1/messages``: answers ``{"message_id", "reply"?}`` once accepted.

        ``raw_payload`` (JSON text) is sent verbatim instead of ``payload``: the node
        keeps the payload's exact text (spacing, key order, number spelling)."""
        head = json.dumps({"to": to, "msg_type": msg_type}, separators=(",", ":"), ensure_ascii=False)
        if raw_payload is None:
            raw_payload = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        body = head[:-1] + ',"payload":' + raw_payload + "}"
        return self.request("POST", "/v1/messages", raw_body=body.encode("utf-8"))

    # -- capability card -------------------------------------------------

    def card(self) -> Dict[str, Any]:
        """``GET /v1/card``: this node's signed card ``{"card": {...}, "signature"}``."""
        return self.request("GET", "/v1/card")

    def set_card(
        self,
        name: str,
        description: str = "",
        version: str = "",
        skills: Iterable[Union[str, Dict[str, Any]]] = (),
        accepts: Iterable[str] = (),
        **extra: Any
    ) -> Dict[str, Any]:
        """``PUT /v1/card``: publishes the agent's card; answers the signed card.

        A skill may be a dict (missing fields are filled: ``name`` = ``id``, empty
        ``description``, ``tags``, ``input_modes``, ``output_modes``, ``examples``) or
        just its id."""
        body = {
            "name": name,
            "description": description,
            "version": version,
            "skills": [skill_entry(s) for s in skills],
            "accepts": list(accepts),
        }
        body.update(extra)
        return self.request("PUT", "/v1/card", body)

    def peer_card(self, entity_id: str) -> Dict[str, Any]:
        """``GET /v1/peers/{entity_id}/card``: a peer's verified card (native form)."""
        return self.request("GET", "/v1/peers/%s/card" % quote(entity_id, safe=""))

    def agent_card(self) -> Dict[str, Any]:
        """``GET /.well-known/agent-card.json``: this node's card in A2A form."""
        return self.request("GET", "/.well-known/agent-card.json")

    # -- tasks -----------------------------------------------------------

    def delegate(
        self,
        to: str,
        skill: str,
        input: JSON = None,
        deadline_s: Optional[float] = None,
        priority: Optional[int] = None,
    ) -> str:
        """``POST /v1/tasks``: asks peer ``to`` to run ``skill``; answers the task id."""
        body = {"to": to, "skill": skill, "input": input}  # type: Dict[str, Any]
        if deadline_s is not None:
            body["deadline_s"] = deadline_s
        if priority is not None:
            body["priority"] = priority
        answer = self.request("POST", "/v1/tasks", body)
        return answer["task_id"]

    def task(self, task_id: str) -> Dict[str, Any]:
        """``GET /v1/tasks/{id}``."""
        return self.request("GET", "/v1/tasks/%s" % quote(task_id, safe=""))

    def tasks(self, role: Optional[str] = None, state: Optional[str] = None) -> List[Dict[str, Any]]:
        """``GET /v1/tasks?role=&state=``: the tasks (assignee+submitted: by priority, then age)."""
        return self.request("GET", "/v1/tasks", query={"role": role, "state": state})["tasks"]

    def cancel(self, task_id: str) -> Dict[str, Any]:
        """``POST /v1/tasks/{id}/cancel`` (delegator): answers the task."""
        return self.request("POST", "/v1/tasks/%s/cancel" % quote(task_id, safe=""), {})

    def set_status(self, task_id: str, state: str, message: Optional[str] = None) -> Dict[str, Any]:
        """``POST /v1/tasks/{id}/status`` (assignee): ``working``, ``input-required``,
        ``failed`` or ``rejected``; answers the task."""
        body = {"state": state}  # type: Dict[str, Any]
        if message is not None:
            body["message"] = message
        return self.request("POST", "/v1/tasks/%s/status" % quote(task_id, safe=""), body)

    def complete(self, task_id: str, output: JSON, artifacts: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        """``POST /v1/tasks/{id}/result`` (assignee): the task is ``completed``."""
        body = {"output": output}  # type: Dict[str, Any]
        if artifacts is not None:
            body["artifacts"] = artifacts
        return self.request("POST", "/v1/tasks/%s/result" % quote(task_id, safe=""), body)

    def delegate_and_wait(
        self,
        to: str,
        skill: str,
        input: JSON = None,
        timeout: float = 60.0,
        deadline_s: Optional[float] = None,
        priority: Optional[int] = None,
        poll_interval: float = 1.0,
        cancel_on_timeout: bool = False,
    ) -> Dict[str, Any]:
        """Delegates a task and waits (at most ``timeout`` s) until it is completed,
        failed, canceled or rejected; answers the final task.

        Waits on the event stream (``task_update`` events) and looks at
        ``GET /v1/tasks/{id}`` too: at start, every few seconds, and every
        ``poll_interval`` s if the stream is unavailable. Raises :class:`TimeoutError`
        (after cancelling the task, if ``cancel_on_timeout``)."""
        end = time.monotonic() + timeout
        stream = EventStream(self, read_timeout=min(45.0, max(timeout, 1.0)) + 5.0, max_retries=3)
        updates = queue.Queue()  # type: queue.Queue
        stream_ok = threading.Event()

        def read() -> None:
            try:
                for ev in stream:
                    stream_ok.set()
                    if ev.type == "task_update":
                        updates.put(ev.get("task"))
            except (PeerError, OSError):
                pass
            finally:
                stream_ok.clear()
                updates.put(None)

        reader = threading.Thread(target=read, name="peer-delegate-wait", daemon=True)
        task_id = None  # type: Optional[str]
        try:
            try:
                stream.connect()
                stream_ok.set()
                reader.start()
            except PeerError:
                stream_ok.clear()
            task_id = self.delegate(to, skill, input, deadline_s=deadline_s, priority=priority)
            last = None  # type: Optional[Dict[str, Any]]
            next_poll = time.monotonic()
            while True:
                now = time.monotonic()
                if now >= next_poll:
                    last = self.task(task_id)
                    if last.get("state") in TERMINAL_STATES:
                        return last
                    next_poll = now + (max(poll_interval, 5.0) if stream_ok.is_set() else poll_interval)
                left = end - now
                if left <= 0:
                    break
                try:
                    t = updates.get(timeout=max(0.0, min(left, next_poll - now)))
                except queue.Empty:
                    continue
                if t is None:  # the stream ended: poll from now on
                    next_poll = min(next_poll, time.monotonic() + poll_interval)
                    continue
                if isinstance(t, dict) and t.get("task_id") == task_id and t.get("role", "delegator") == "delegator":
                    last = t
                    if t.get("state") in TERMINAL_STATES:
                        return t
            state = last.get("state") if last else "unknown"
            if cancel_on_timeout:
                try:
                    self.cancel(task_id)
                except PeerError:
                    pass
            raise TimeoutError("task %s (%s to %s) not finished within %ss; last state: %s" % (task_id, skill, to, timeout, state))
        finally:
            stream.close()

    # -- events and inbox --------------------------------------------------

    def events(
        self,
        last_event_id: Optional[int] = None,
        auto_ack: bool = False,
        **options: Any
    ) -> EventStream:
        """``GET /v1/events`` as an iterator of :class:`~peer_protocol.events.Event`,
        resuming after disconnects (see :class:`~peer_protocol.events.EventStream`)."""
        return EventStream(self, last_event_id=last_event_id, auto_ack=auto_ack, **options)

    def inbox(self, after: int = 0, limit: int = 100) -> Dict[str, Any]:
        """``GET /v1/inbox?after=&limit=``: ``{"events": [{"id", "event"}], "next_after"}``."""
        return self.request("GET", "/v1/inbox", query={"after": after, "limit": limit})

    def ack(self, up_to: int) -> Dict[str, Any]:
        """``POST /v1/inbox/ack``: releases durable events with id <= ``up_to``;
        answers ``{"acked", "remaining"}``."""
        return self.request("POST", "/v1/inbox/ack", {"up_to": up_to})


def skill_entry(skill: Union[str, Dict[str, Any]]) -> Dict[str, Any]:
    """A card skill entry with every field the node expects."""
    entry = {"id": skill} if isinstance(skill, str) else dict(skill)
    if "id" not in entry:
        raise ValueError("a skill needs an id: %r" % (skill,))
    entry.setdefault("name", entry["id"])
    entry.setdefault("description", "")
    for key in ("tags", "input_modes", "output_modes", "examples"):
        entry.setdefault(key, [])
    return entry
