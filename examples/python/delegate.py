#!/usr/bin/env python3
"""Delegates one task to a peer and prints the final task as JSON.

    python3 examples/python/delegate.py --data-dir /tmp/alice --to <BOB_ENTITY_ID> \
        --skill summarise --input '{"text": "Peer Protocol is a p2p network. It is fast."}'

Exit status: 0 if the task completed, 1 if it failed, was rejected or canceled, or
an API error occurred, 2 on timeout.
"""

import argparse
import json
import os
import sys

try:
    import peer_protocol  # noqa: F401
except ImportError:  # run from a checkout without installing the SDK
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "sdk", "python"))

from peer_protocol import Client, PeerError


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("PEER_DATA_DIR", os.path.expanduser("~/.peer")))
    ap.add_argument("--to", required=True, help="the assignee's entity id")
    ap.add_argument("--skill", default="summarise")
    ap.add_argument("--input", default="null", help="the task's input, as JSON")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args(argv)
    client = Client.from_data_dir(args.data_dir)
    try:
        task = client.delegate_and_wait(args.to, args.skill, json.loads(args.input), timeout=args.timeout)
    except TimeoutError as e:
        print("timeout: %s" % e, file=sys.stderr)
        return 2
    except PeerError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    print(json.dumps(task, indent=2, sort_keys=True))
    return 0 if task["state"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
