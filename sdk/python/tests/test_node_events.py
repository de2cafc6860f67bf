"""Integration (real nodes): GET /v1/events through EventStream. Feature ``events``."""

import json
import threading
import unittest
import uuid

from _support import STEP, next_event, require_node


def setUpModule():
    global A, B, A_ID, B_ID
    A, B = require_node("events")
    A_ID = A.health()["entity_id"]
    B_ID = B.health()["entity_id"]


def is_message(marker):
    return lambda ev: ev.type == "message" and isinstance(ev.get("payload"), dict) and ev["payload"].get("marker") == marker


class EventsTest(unittest.TestCase):
    def setUp(self):
        self.stream = B.events(read_timeout=STEP + 30)
        self.stream.connect()  # subscribed once the headers are in

    def tearDown(self):
        self.stream.close()

    def test_message_event(self):
        marker = str(uuid.uuid4())
        sent = A.send(B_ID, "message", {"marker": marker, "text": "hi"})
        ev = next_event(self.stream, is_message(marker))
        self.assertEqual(ev["message_id"], sent["message_id"])
        self.assertEqual(ev["from"], A_ID)
        self.assertEqual(ev["msg_type"], "message")
        self.assertEqual(ev["payload"], {"marker": marker, "text": "hi"})

    def test_multi_line_payload_text(self):
        # the node keeps the payload's text: line breaks make several data: lines
        marker = str(uuid.uuid4())
        raw = json.dumps({"marker": marker, "list": [1, 2, {"a": "b"}]}, indent=2)
        A.send(B_ID, "message", raw_payload=raw)
        ev = next_event(self.stream, is_message(marker))
        self.assertEqual(ev["payload"], json.loads(raw))
        self.assertIn('"payload":' + raw, ev.raw)

    def test_chunked_message_in_one_event(self):
        marker = str(uuid.uuid4())
        blob = "y" * 100000  # several 32 KiB chunks
        A.send(B_ID, "message", {"marker": marker, "blob": blob})
        ev = next_event(self.stream, is_message(marker))
        self.assertEqual(len(ev["payload"]["blob"]), len(blob))

    def test_messages_in_order(self):
        marker = str(uuid.uuid4())
        for n in range(5):
            A.send(B_ID, "message", {"marker": marker, "n": n})
        got = []
        for _ in range(5):
            got.append(next_event(self.stream, is_message(marker))["payload"]["n"])
        self.assertEqual(got, list(range(5)))

    def test_two_streams_each_get_every_event(self):
        other = B.events()
        other.connect()
        try:
            marker = str(uuid.uuid4())
            A.send(B_ID, "message", {"marker": marker})
            self.assertEqual(next_event(other, is_message(marker))["payload"]["marker"], marker)
            self.assertEqual(next_event(self.stream, is_message(marker))["payload"]["marker"], marker)
        finally:
            other.close()

    def test_close_ends_a_blocked_read(self):
        ended = threading.Event()

        def read():
            for _ in self.stream:
                pass
            ended.set()

        threading.Thread(target=read, daemon=True).start()
        self.stream.close()
        self.assertTrue(ended.wait(5))


if __name__ == "__main__":
    unittest.main()
