"""Integration (real nodes): health, stats, metrics, authentication. Feature ``health``."""

import os
import unittest

from _support import require_node
from peer_protocol import Client, PeerError


def setUpModule():
    global A, B
    A, B = require_node("health")


class HealthTest(unittest.TestCase):
    def test_health(self):
        h = A.health()
        self.assertEqual(h["status"], "ok")
        self.assertEqual(h["protocol_version"], "1.2")
        self.assertEqual(len(h["entity_id"]), 64)
        self.assertTrue(h["listen_addrs"])
        self.assertNotEqual(h["entity_id"], B.health()["entity_id"])

    def test_from_data_dir_matches(self):
        c = Client.from_data_dir(os.environ["PEER_TEST_DATA_DIR_A"])
        self.assertEqual(c.base_url, A.base_url)
        self.assertEqual(len(c.token), 64)

    def test_health_needs_no_token(self):
        self.assertEqual(Client(A.base_url, None).health()["status"], "ok")

    def test_wrong_token_is_unauthorized(self):
        for token in (None, "not-the-token"):
            with self.assertRaises(PeerError) as cm:
                Client(A.base_url, token).stats()
            self.assertEqual((cm.exception.status, cm.exception.code), (401, "UNAUTHORIZED"))

    def test_stats_and_metrics(self):
        stats = A.stats()
        self.assertIn("peers", stats)
        self.assertIn("other", stats)
        metrics = A.metrics()
        self.assertIn("peer_connected_peers", metrics)
        self.assertTrue(metrics.rstrip().endswith("# EOF"), metrics[-200:])

    def test_unknown_route(self):
        with self.assertRaises(PeerError) as cm:
            A.request("GET", "/v1/no-such-route")
        self.assertEqual(cm.exception.status, 404)


if __name__ == "__main__":
    unittest.main()
