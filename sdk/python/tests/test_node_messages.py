"""Integration (real nodes): POST /v1/messages. Feature ``messages``."""

import unittest

from _support import require_node
from peer_protocol import PeerError


def setUpModule():
    global A, B, B_ID
    A, B = require_node("messages")
    B_ID = B.health()["entity_id"]


class MessagesTest(unittest.TestCase):
    def test_send_message(self):
        ans = A.send(B_ID, "message", {"text": "hello from python"})
        self.assertEqual(len(ans["message_id"]), 36)
        self.assertNotIn("reply", ans)

    def test_ping_is_answered_with_pong(self):
        ans = A.send(B_ID, "ping", {"n": 7})
        self.assertEqual(ans["reply"], {"msg_type": "pong", "payload": {"n": 7}})

    def test_refusals(self):
        with self.assertRaises(PeerError) as cm:
            A.send(B_ID, "no_such_type", {})
        self.assertEqual((cm.exception.status, cm.exception.code), (422, "UNSUPPORTED_MSG_TYPE"))
        with self.assertRaises(PeerError) as cm:
            A.send("zz", "message", {})
        self.assertEqual((cm.exception.status, cm.exception.code), (400, "INVALID_REQUEST"))
        with self.assertRaises(PeerError) as cm:
            A.send("00" * 31 + "01", "message", {})
        self.assertEqual((cm.exception.status, cm.exception.code), (404, "NOT_CONNECTED"))


if __name__ == "__main__":
    unittest.main()
