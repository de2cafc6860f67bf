"""Python SDK for Peer Protocol v1.2: a client of a node's local HTTP API.

Standard library only. Start with :class:`Client` (or ``Client.from_data_dir``), read
events with :meth:`Client.events`, and serve skills with :class:`Agent`.
"""

from .agent import Agent, Reject, Result
from .client import TERMINAL_STATES, Client, skill_entry
from .errors import PeerError
from .events import Event, EventStream, SSEParser

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "Client",
    "Event",
    "EventStream",
    "PeerError",
    "Reject",
    "Result",
    "SSEParser",
    "TERMINAL_STATES",
    "skill_entry",
]
