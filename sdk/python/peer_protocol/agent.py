"""Serve skills: an agent that answers the tasks its node receives."""

import inspect
import logging
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional

from .client import Client, skill_entry
from .errors import PeerError
from .events import Event, EventStream

log = logging.getLogger("peer_protocol.agent")

Handler = Callable[..., Any]


class Reject(Exception):
    """Raise from a skill handler to refuse the task (state ``rejected``) instead of
    failing it; the exception's text is the reason."""


class Result:
    """Return from a skill handler to attach artifacts to the output:
    ``Result(output, artifacts=[{"name", "mime_type", "data"}])``."""

    def __init__(self, output: Any, artifacts: Optional[List[Dict[str, Any]]] = None) -> None:
        self.output = output
        self.artifacts = artifacts


class Agent:
    """Serves skills on a node's tasks.

    >>> agent = Agent(Client.from_data_dir("/tmp/b"))
    >>> @agent.skill("summarise")
    ... def summarise(input):
    ...     return {"summary": input["text"][:100]}
    >>> agent.run()          # blocks; agent.stop() from another thread ends it

    For each ``task_update`` event of a new task (role ``assignee``, state ``submitted``)
    the agent reports ``working``, calls the skill's handler with the task's input (and
    the task, if the handler takes a second parameter), then posts the handler's return
    value as the result (``completed``), or ``failed`` with the exception's message
    (``rejected`` for :class:`Reject`). A task for a skill it does not serve is
    ``rejected`` with a reason. Handled events are acknowledged (durable inbox).
    Tasks run one at a time, in event order.
    """

    def __init__(self, client: Client, name: Optional[str] = None, description: str = "", version: str = "") -> None:
        self.client = client
        self.name = name
        self.description = description
        self.version = version
        self.skills = OrderedDict()  # type: OrderedDict[str, Handler]
        self.skill_info = OrderedDict()  # type: OrderedDict[str, Dict[str, Any]]
        self._message_handlers = []  # type: List[Handler]
        self._seen = OrderedDict()  # type: OrderedDict[str, None]
        self._stream = None  # type: Optional[EventStream]
        self._stopped = threading.Event()
        self.ready = threading.Event()
        self.handled = 0  # tasks answered (completed, failed or rejected)

    # -- registration ----------------------------------------------------

    def skill(self, skill_id: str, **card_fields: Any) -> Callable[[Handler], Handler]:
        """Decorator: ``@agent.skill("summarise", description="...")`` serves that skill
        with the decorated function. ``card_fields`` go into the card's skill entry."""

        def register(fn: Handler) -> Handler:
            self.add_skill(skill_id, fn, **card_fields)
            return fn

        return register

    def add_skill(self, skill_id: str, handler: Handler, **card_fields: Any) -> None:
        self.skills[skill_id] = handler
        info = dict(card_fields)
        info["id"] = skill_id
        if "description" not in info and handler.__doc__:
            info["description"] = inspect.cleandoc(handler.__doc__).split("\n\n")[0]
        self.skill_info[skill_id] = skill_entry(info)

    def on_message(self, fn: Handler) -> Handler:
        """Decorator: ``fn(event)`` is called for each ``message`` event."""
        self._message_handlers.append(fn)
        return fn

    def publish_card(self, accepts: Optional[List[str]] = None, **extra: Any) -> Dict[str, Any]:
        """``PUT /v1/card`` with this agent's name and skills; answers the signed card."""
        name = self.name or "python-agent"
        return self.client.set_card(
            name,
            self.description,
            self.version,
            skills=list(self.skill_info.values()),
            accepts=accepts or [],
            **extra
        )

    # -- running ---------------------------------------------------------

    def run(self, on_ready: Optional[Callable[[], None]] = None, last_event_id: Optional[int] = None) -> None:
        """Serves until :meth:`stop`. ``on_ready`` is called once the event stream is open."""
        self._stopped.clear()
        stream = self.client.events(last_event_id=last_event_id, auto_ack=True)
        self._stream = stream
        try:
            stream.connect()
            self.ready.set()
            if on_ready is not None:
                on_ready()
            self._sweep()
            for event in stream:
                # After stop(), the stream ends at the next read, acknowledging this
                # event first (auto_ack acknowledges an event when the next is asked for).
                self.handle_event(event)
        finally:
            stream.close()
            self._stream = None

    def start(self) -> threading.Thread:
        """Runs :meth:`run` in a daemon thread; answers it once the stream is open."""
        errors = []  # type: List[BaseException]

        def target() -> None:
            try:
                self.run()
            except BaseException as e:  # noqa: B902 - reported to the caller
                if self.ready.is_set():
                    log.exception("the agent stopped")
                errors.append(e)
                self.ready.set()

        thread = threading.Thread(target=target, name="peer-agent", daemon=True)
        thread.start()
        self.ready.wait()
        if errors:
            raise errors[0]
        return thread

    def stop(self) -> None:
        self._stopped.set()
        stream = self._stream
        if stream is not None:
            stream.close()

    # -- handling --------------------------------------------------------

    def _sweep(self) -> None:
        """Submitted tasks already waiting (e.g. whose events another client acked)."""
        try:
            waiting = self.client.tasks(role="assignee", state="submitted")
        except PeerError as e:
            log.info("cannot list waiting tasks (%s); serving new ones from events", e)
            return
        for task in waiting:
            self.handle_task(task)

    def handle_event(self, event: Event) -> None:
        if event.type == "task_update":
            task = event.get("task")
            if isinstance(task, dict):
                self.handle_task(task)
        elif event.type == "message":
            for fn in self._message_handlers:
                try:
                    fn(event)
                except Exception:  # a handler's bug must not stop the agent
                    log.exception("message handler failed on %r", event)

    def handle_task(self, task: Dict[str, Any]) -> None:
        """Serves one task if it is new to this agent's node (assignee, submitted)."""
        if task.get("role") != "assignee" or task.get("state") != "submitted":
            return
        task_id = task.get("task_id")
        if not isinstance(task_id, str) or task_id in self._seen:
            return
        self._seen[task_id] = None
        while len(self._seen) > 10000:
            self._seen.popitem(last=False)
        skill = task.get("skill")
        handler = self.skills.get(skill) if isinstance(skill, str) else None
        if handler is None:
            served = ", ".join(self.skills) or "none"
            self._report(task_id, "rejected", "unknown skill %r; this agent serves: %s" % (skill, served))
            return
        try:
            self.client.set_status(task_id, "working")
        except PeerError as e:
            # canceled meanwhile (409 INVALID_STATE), or gone: nothing to do
            log.info("task %s: cannot start (%s)", task_id, e)
            return
        try:
            result = self._call(handler, task)
        except Reject as e:
            self._report(task_id, "rejected", str(e) or "rejected by the agent")
            return
        except Exception as e:
            log.info("task %s (%s) failed: %r", task_id, skill, e)
            self._report(task_id, "failed", str(e) or type(e).__name__)
            return
        if isinstance(result, Result):
            output, artifacts = result.output, result.artifacts
        else:
            output, artifacts = result, None
        try:
            self.client.complete(task_id, output, artifacts)
            self.handled += 1
        except PeerError as e:
            log.warning("task %s: cannot post the result (%s)", task_id, e)
        except (TypeError, ValueError) as e:  # output not JSON-serialisable
            self._report(task_id, "failed", "the skill's output is not JSON: %s" % e)

    @staticmethod
    def _call(handler: Handler, task: Dict[str, Any]) -> Any:
        try:
            params = inspect.signature(handler).parameters.values()
            positional = [
                p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            takes_task = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
        except (TypeError, ValueError):
            takes_task = False
        if takes_task:
            return handler(task.get("input"), task)
        return handler(task.get("input"))

    def _report(self, task_id: str, state: str, message: str) -> None:
        try:
            self.client.set_status(task_id, state, message)
            self.handled += 1
        except PeerError as e:
            log.warning("task %s: cannot report %s (%s)", task_id, state, e)
