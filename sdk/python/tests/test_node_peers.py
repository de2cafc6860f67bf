"""Integration (real nodes): GET/POST /v1/peers. Feature ``peers``."""

import unittest

from _support import require_node
from peer_protocol import PeerError


def setUpModule():
    global A, B, B_ID
    A, B = require_node("peers")
    B_ID = B.health()["entity_id"]


class PeersTest(unittest.TestCase):
    def test_b_is_listed_as_connected(self):
        peers = A.peers()
        self.assertIsInstance(peers, list)
        b = [p for p in peers if p["entity_id"] == B_ID]
        self.assertEqual(len(b), 1, peers)
        self.assertTrue(b[0]["connected"])
        self.assertTrue(b[0]["peer_id"])

    def test_connect(self):
        addr = B.health()["listen_addrs"][0]
        try:
            peer = A.connect(addr)
        except PeerError as e:
            # each POST /v1/peers opens a connection; reruns against the same nodes
            # reach network.max_connections_per_peer (3)
            if e.code == "DIAL_FAILED" and e.message == "could not connect: Dial error":
                self.skipTest("connections per peer at their limit; run against fresh nodes")
            raise
        self.assertEqual(peer["entity_id"], B_ID)
        self.assertTrue(peer["connected"])

    def test_connect_errors(self):
        with self.assertRaises(PeerError) as cm:
            A.connect("not a multiaddr")
        self.assertEqual((cm.exception.status, cm.exception.code), (400, "INVALID_REQUEST"))
        with self.assertRaises(PeerError) as cm:
            A.connect("/ip4/127.0.0.1/tcp/1")
        self.assertEqual((cm.exception.status, cm.exception.code), (502, "DIAL_FAILED"))


if __name__ == "__main__":
    unittest.main()
