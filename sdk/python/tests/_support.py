"""Shared test helpers: the import path, node selection by environment, a fake node.

Environment (integration tests, ``test_node_*.py``):

- ``PEER_TEST_DATA_DIR_A``, ``PEER_TEST_DATA_DIR_B``: data directories of two running
  nodes, A connected to B. Unset: the integration tests are skipped (unless
  ``PEER_TEST_REQUIRE_NODE=1``, then they fail).
- ``PEER_TEST_FEATURES``: comma-separated node features to test (``health``, ``peers``,
  ``messages``, ``events``, ``inbox``, ``cards``, ``tasks``, ``heartbeat``). Unset: all.
  A module whose feature is not listed is skipped.
"""

import json
import os
import sys
import threading
import time
import unittest
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
SDK = os.path.dirname(HERE)
if SDK not in sys.path:
    sys.path.insert(0, SDK)

from peer_protocol import Client  # noqa: E402

ALL_FEATURES = ("health", "peers", "messages", "events", "inbox", "cards", "tasks", "heartbeat")

#: Time allowed for one step against a real node.
STEP = 15.0


def require_node(feature: str) -> Tuple[Client, Client]:
    """Clients of nodes A and B, or SkipTest (see the module doc)."""
    if feature not in ALL_FEATURES:
        raise ValueError("unknown feature %r" % feature)
    enabled = os.environ.get("PEER_TEST_FEATURES")
    if enabled is not None:
        wanted = {f.strip() for f in enabled.split(",") if f.strip()}
        if feature not in wanted:
            raise unittest.SkipTest("node feature %r not enabled (PEER_TEST_FEATURES=%s)" % (feature, enabled))
    a = os.environ.get("PEER_TEST_DATA_DIR_A")
    b = os.environ.get("PEER_TEST_DATA_DIR_B")
    if not a or not b:
        msg = "set PEER_TEST_DATA_DIR_A and PEER_TEST_DATA_DIR_B to two running, connected nodes"
        if os.environ.get("PEER_TEST_REQUIRE_NODE") == "1":
            raise RuntimeError(msg)
        raise unittest.SkipTest(msg)
    return Client.from_data_dir(a, timeout=STEP), Client.from_data_dir(b, timeout=STEP)


def wait_for(what: str, check: Any, timeout: float = STEP, interval: float = 0.05) -> Any:
    """Calls ``check()`` until it answers something truthy; answers it."""
    end = time.monotonic() + timeout
    last = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > end:
            raise AssertionError("%s: not within %ss (last: %r)" % (what, timeout, last))
        time.sleep(interval)


def next_event(stream: Any, want: Any, timeout: float = STEP) -> Any:
    """The next event of ``stream`` (an EventStream) for which ``want(event)`` holds,
    read in a thread so that the test cannot hang."""
    box = []  # type: List[Any]
    done = threading.Event()

    def read() -> None:
        try:
            for ev in stream:
                if want(ev):
                    box.append(ev)
                    break
        except BaseException as e:  # noqa: B902 - handed to the test
            box.append(e)
        finally:
            done.set()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    if not done.wait(timeout):
        stream.close()
        raise AssertionError("no matching event within %ss" % timeout)
    if not box:
        raise AssertionError("the event stream ended")
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


# ---------------------------------------------------------------------------
# A fake node: the API shapes of docs/API.md and the issue 8 spec, in memory.
# ---------------------------------------------------------------------------

TERMINAL = {"completed", "failed", "canceled", "rejected"}


class FakeNode:
    """An in-process HTTP server speaking the node API (enough for the SDK's tests).

    ``requests`` records ``(method, path, headers, body bytes)``. ``fail_next`` maps
    ``(method, path)`` to ``(status, body dict or None, headers)`` answered once.
    ``drop_after`` closes each event stream after that many events (resume tests).
    Tasks delegated ``to`` this node's own entity id appear on both sides, as between
    two nodes.
    """

    def __init__(self, token: str = "t0ken", ids: bool = True) -> None:
        self.token = token
        self.ids = ids
        self.entity_id = "ab" * 32
        self.cond = threading.Condition()
        self.durable = []  # type: List[Tuple[int, Dict[str, Any]]]
        self.ephemeral = []  # type: List[Tuple[int, Dict[str, Any]]]  # (seq, event)
        self.next_id = 1
        self.seq = 0
        self.acked = 0
        self.tasks = {}  # type: Dict[Tuple[str, str], Dict[str, Any]]
        self.requests = []  # type: List[Tuple[str, str, Dict[str, str], bytes]]
        self.fail_next = {}  # type: Dict[Tuple[str, str], Tuple[int, Any, Dict[str, str]]]
        self.drop_after = None  # type: Optional[int]
        self.streams_opened = 0
        self.last_event_ids = []  # type: List[Optional[str]]  # Last-Event-ID per stream
        self.keepalive = 0.2
        self.honour_resume = True  # False: ignore Last-Event-ID, replay every unacked event
        self.stopped = False
        node = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                node._handle(self, "GET")

            def do_POST(self) -> None:
                node._handle(self, "POST")

            def do_PUT(self) -> None:
                node._handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]

    def client(self, **kw: Any) -> Client:
        return Client(self.url, self.token, **kw)

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # -- events ------------------------------------------------------------

    def push(self, event: Dict[str, Any], durable: Optional[bool] = None) -> Optional[int]:
        """Adds an event (durable: ``message`` and ``task_update`` by default)."""
        if durable is None:
            durable = event.get("type") in ("message", "task_update")
        with self.cond:
            self.seq += 1
            if durable:
                eid = self.next_id
                self.next_id += 1
                event = dict(event, event_id=eid) if self.ids else dict(event)
                self.durable.append((eid, event))
            else:
                eid = None
            self.ephemeral.append((self.seq, event if not durable else {"__durable__": eid}))
            self.cond.notify_all()
            return eid

    def _stream(self, h: BaseHTTPRequestHandler, after: Optional[int]) -> None:
        with self.cond:  # subscribed before the client sees the headers
            self.streams_opened += 1
            # history: unacked durable events after `after` (or all unacked)
            floor = self.acked if after is None else max(after, 0)
            backlog = [(eid, ev) for eid, ev in self.durable if eid > floor]
            seen_seq = self.seq
            drop_after = self.drop_after
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def write(text: str) -> None:
            data = text.encode("utf-8")
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        sent = 0
        last_sent_durable = backlog[-1][0] if backlog else floor
        try:
            for eid, ev in backlog:
                write(self._frame(eid, ev))
                sent += 1
                if drop_after is not None and sent >= drop_after:
                    return
            while True:
                with self.cond:
                    if self.stopped:
                        return
                    fresh = [(s, e) for s, e in self.ephemeral if s > seen_seq]
                    if not fresh:
                        self.cond.wait(self.keepalive)
                        fresh = [(s, e) for s, e in self.ephemeral if s > seen_seq]
                    if fresh:
                        seen_seq = fresh[-1][0]
                    durable = dict(self.durable)
                if not fresh:
                    write(":\n\n")
                    continue
                for _, ev in fresh:
                    if "__durable__" in ev:
                        eid = ev["__durable__"]
                        if eid <= last_sent_durable:
                            continue
                        last_sent_durable = eid
                        write(self._frame(eid, durable[eid]))
                    else:
                        write(self._frame(None, ev))
                    sent += 1
                    if drop_after is not None and sent >= drop_after:
                        return
        except (BrokenPipeError, ConnectionResetError):
            return
        finally:
            try:
                h.wfile.write(b"0\r\n\r\n")
                h.wfile.flush()
            except OSError:
                pass
            h.close_connection = True

    def _frame(self, eid: Optional[int], ev: Dict[str, Any]) -> str:
        text = "data: " + json.dumps(ev) + "\n\n"
        if eid is not None and self.ids:
            text = "id: %d\n" % eid + text
        return text

    # -- tasks ---------------------------------------------------------------

    def _task_event(self, task: Dict[str, Any]) -> None:
        self.push({"type": "task_update", "task": dict(task)})

    def _new_task(self, body: Dict[str, Any]) -> Dict[str, Any]:
        now = int(time.time() * 1000)
        task_id = str(uuid.uuid4())
        base = {
            "task_id": task_id,
            "skill": body["skill"],
            "input": body.get("input"),
            "priority": body.get("priority", 5),
            "deadline_ms": None if body.get("deadline_s") is None else now + int(body["deadline_s"] * 1000),
            "state": "submitted",
            "message": None,
            "output": None,
            "artifacts": [],
            "created_ms": now,
            "updated_ms": now,
        }
        mine = dict(base, role="delegator", peer=body["to"])
        self.tasks[(task_id, "delegator")] = mine
        self._task_event(mine)
        if body["to"] == self.entity_id:
            theirs = dict(base, role="assignee", peer=self.entity_id)
            self.tasks[(task_id, "assignee")] = theirs
            self._task_event(theirs)
        return mine

    def _change(self, task_id: str, role: str, **fields: Any) -> Tuple[int, Any]:
        task = self.tasks.get((task_id, role))
        if task is None:
            return 404, {"error": {"code": "NOT_FOUND", "message": "no task %s" % task_id}}
        if task["state"] in TERMINAL:
            return 409, {"error": {"code": "INVALID_STATE", "message": "task is %s" % task["state"]}}
        for r in ("delegator", "assignee"):
            t = self.tasks.get((task_id, r))
            if t is not None:
                t.update(fields, updated_ms=int(time.time() * 1000))
                self._task_event(t)
        return 200, dict(self.tasks[(task_id, role)])

    # -- dispatch ------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(h.path)
        path = parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        self.requests.append((method, h.path, dict(h.headers.items()), raw))
        injected = self.fail_next.pop((method, path), None)
        if injected is not None:
            status, body, headers = injected
            return self._answer(h, status, body, headers)
        if path == "/v1/health" and method == "GET":
            return self._answer(h, 200, {"status": "ok", "entity_id": self.entity_id, "listen_addrs": [], "protocol_version": "1.2"})
        if h.headers.get("Authorization") != "Bearer " + self.token:
            return self._answer(h, 401, {"error": {"code": "UNAUTHORIZED", "message": "send the token"}})
        try:
            body = json.loads(raw.decode("utf-8")) if raw else None
        except ValueError:
            return self._answer(h, 400, {"error": {"code": "INVALID_REQUEST", "message": "not JSON"}})
        with self.cond:
            status, answer = self._route(h, method, path, query, body)
        if status == -1:  # the event stream
            after = h.headers.get("Last-Event-ID") or query.get("after")
            self.last_event_ids.append(h.headers.get("Last-Event-ID"))
            return self._stream(h, int(after) if after and self.honour_resume else None)
        if status == -2:
            return self._answer(h, 200, None, text=answer)
        return self._answer(h, status, answer)

    def _route(self, h: Any, method: str, path: str, query: Dict[str, str], body: Any) -> Tuple[int, Any]:
        seg = path.strip("/").split("/")
        if path == "/v1/events" and method == "GET":
            return -1, None
        if path == "/metrics" and method == "GET":
            return -2, "# TYPE peer_connected_peers gauge\npeer_connected_peers 0\n# EOF\n"
        if path == "/v1/stats" and method == "GET":
            return 200, {"peers": {}, "other": {"sent": 0, "received": 0, "rejected": {}, "refused_by_peer": {}}}
        if path == "/v1/peers" and method == "GET":
            return 200, []
        if path == "/v1/peers" and method == "POST":
            return 200, {"entity_id": "cd" * 32, "addrs": [body["addr"]], "connected": True}
        if path == "/v1/messages" and method == "POST":
            if body["to"] == self.entity_id:
                self.push({"type": "message", "message_id": str(uuid.uuid4()), "from": self.entity_id, "msg_type": body["msg_type"], "payload": body["payload"]})
            return 200, {"message_id": str(uuid.uuid4())}
        if path == "/v1/inbox" and method == "GET":
            after = int(query.get("after", 0))
            limit = int(query.get("limit", 100))
            evs = [{"id": i, "event": e} for i, e in self.durable if i > max(after, self.acked)][:limit]
            return 200, {"events": evs, "next_after": evs[-1]["id"] if evs else after}
        if path == "/v1/inbox/ack" and method == "POST":
            up_to = body["up_to"]
            before = self.acked
            self.acked = max(self.acked, up_to)
            acked = len([i for i, _ in self.durable if before < i <= self.acked])
            remaining = len([i for i, _ in self.durable if i > self.acked])
            return 200, {"acked": acked, "remaining": remaining}
        if path == "/v1/card" and method == "PUT":
            self.card = {"card": dict(body, entity_id=self.entity_id, sequence=1), "signature": "00"}
            return 200, self.card
        if path == "/v1/card" and method == "GET":
            return 200, getattr(self, "card", {"card": {}, "signature": ""})
        if path == "/.well-known/agent-card.json" and method == "GET":
            return 200, {"name": "fake", "skills": [], "defaultInputModes": []}
        if len(seg) == 4 and seg[:2] == ["v1", "peers"] and seg[3] == "card" and method == "GET":
            return 404, {"error": {"code": "NOT_FOUND", "message": "no card for %s" % seg[2]}}
        if path == "/v1/tasks" and method == "POST":
            return 200, {"task_id": self._new_task(body)["task_id"]}
        if path == "/v1/tasks" and method == "GET":
            ts = [t for t in self.tasks.values() if query.get("role") in (None, t["role"]) and query.get("state") in (None, t["state"])]
            return 200, {"tasks": ts}
        if len(seg) >= 3 and seg[:2] == ["v1", "tasks"]:
            task_id = seg[2]
            if len(seg) == 3 and method == "GET":
                t = self.tasks.get((task_id, "delegator")) or self.tasks.get((task_id, "assignee"))
                if t is None:
                    return 404, {"error": {"code": "NOT_FOUND", "message": "no task"}}
                return 200, t
            if len(seg) == 4 and method == "POST":
                if seg[3] == "cancel":
                    return self._change(task_id, "delegator", state="canceled")
                if seg[3] == "status":
                    if body.get("state") not in ("working", "input-required", "failed", "rejected"):
                        return 400, {"error": {"code": "INVALID_REQUEST", "message": "bad state"}}
                    return self._change(task_id, "assignee", state=body["state"], message=body.get("message"))
                if seg[3] == "result":
                    return self._change(task_id, "assignee", state="completed", output=body["output"], artifacts=body.get("artifacts") or [])
        return 404, None

    @staticmethod
    def _answer(h: BaseHTTPRequestHandler, status: int, body: Any, headers: Optional[Dict[str, str]] = None, text: Optional[str] = None) -> None:
        if text is not None:
            data = text.encode("utf-8")
        else:
            data = b"" if body is None else json.dumps(body).encode("utf-8")
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Type", "text/plain" if text is not None else "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
        h.wfile.flush()
