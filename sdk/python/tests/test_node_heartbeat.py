"""Integration (real nodes): peer health in GET /v1/peers. Feature ``heartbeat``.

Written against /work/spec/issue8-api.md ("Heartbeat"); fails until the node has it."""

import unittest

from _support import require_node, wait_for


def setUpModule():
    global A, B, B_ID
    A, B = require_node("heartbeat")
    B_ID = B.health()["entity_id"]


class HeartbeatTest(unittest.TestCase):
    def test_connected_peer_has_health(self):
        def health():
            for p in A.peers():
                if p["entity_id"] == B_ID and "health" in p:
                    return p["health"]
            return None

        h = wait_for("B's health on A", health, timeout=60, interval=0.5)
        self.assertIn(h["state"], ("healthy", "degraded", "unreachable"))
        for field in ("rtt_ms", "sent", "received", "failed", "last_seen_ms"):
            self.assertIn(field, h)


if __name__ == "__main__":
    unittest.main()
