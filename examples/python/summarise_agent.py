#!/usr/bin/env python3
"""An agent that serves the skill "summarise" on its Peer Protocol node.

    python3 examples/python/summarise_agent.py --data-dir /tmp/bob

Input: {"text": "...", "sentences": 1} (or just a string). Output:
{"summary": "<first sentences>", "words": <word count>}. An empty text fails the task.
Plain `message` events are printed as they arrive. Stops on Ctrl-C.

Uses the SDK in sdk/python (pip install -e sdk/python, or run from the repository:
the script finds the SDK there).
"""

import argparse
import json
import os
import re
import signal
import sys
import threading

try:
    import peer_protocol
except ImportError:  # run from a checkout without installing the SDK
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "sdk", "python"))
    import peer_protocol

from peer_protocol import Agent, Client, PeerError, Reject


def summarise_text(text, sentences=1):
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]
    return " ".join(parts[:sentences])


def build_agent(client):
    agent = Agent(client, name="summariser", description="Summarises text (first sentences)", version="0.1.0")

    @agent.skill("summarise", tags=["text"], input_modes=["application/json"], output_modes=["application/json"])
    def summarise(input):
        """Summarises a text: its first sentence(s)."""
        if isinstance(input, str):
            input = {"text": input}
        if not isinstance(input, dict) or not isinstance(input.get("text"), str):
            raise Reject('input must be {"text": "..."} or a string')
        text = input["text"]
        if not text.strip():
            raise ValueError("nothing to summarise: the text is empty")
        n = input.get("sentences", 1)
        return {"summary": summarise_text(text, n if isinstance(n, int) and n > 0 else 1), "words": len(text.split())}

    @agent.on_message
    def show(event):
        print("message from %s: %s %s" % (event.get("from"), event.get("msg_type"), json.dumps(event.get("payload"))), flush=True)

    return agent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("PEER_DATA_DIR", os.path.expanduser("~/.peer")), help="the node's data directory (api.addr, api-token)")
    ap.add_argument("--api-url", help="the node's API base URL (default: from <data-dir>/api.addr)")
    ap.add_argument("--no-card", action="store_true", help="do not publish the agent's capability card")
    args = ap.parse_args(argv)

    if args.api_url:
        with open(os.path.join(args.data_dir, "api-token"), encoding="utf-8") as f:
            client = Client(args.api_url, f.read().strip())
    else:
        client = Client.from_data_dir(args.data_dir)
    agent = build_agent(client)
    me = client.health()["entity_id"]

    if not args.no_card:
        try:
            agent.publish_card(accepts=["message"])
            print("published card with skills: %s" % ", ".join(agent.skills), flush=True)
        except PeerError as e:
            print("could not publish the card (%s); serving anyway" % e, flush=True)

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        agent.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    agent.run(on_ready=lambda: print("ready: serving %s as %s" % (", ".join(agent.skills), me), flush=True))
    print("stopped after answering %d task(s)" % agent.handled, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
