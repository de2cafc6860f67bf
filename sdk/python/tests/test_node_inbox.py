"""Integration (real nodes): durable inbox, event ids, resume, ack. Feature ``inbox``.

Written against /work/spec/issue8-api.md ("Events and the durable inbox"); fails until
the node has the inbox."""

import unittest
import uuid

from _support import STEP, next_event, require_node, wait_for


def setUpModule():
    global A, B, B_ID
    A, B = require_node("inbox")
    B_ID = B.health()["entity_id"]


def is_message(marker):
    return lambda ev: ev.type == "message" and isinstance(ev.get("payload"), dict) and ev["payload"].get("marker") == marker


def inbox_all(client, after=0):
    out = []
    while True:
        page = client.inbox(after=after, limit=1000)
        out.extend(page["events"])
        if not page["events"]:
            return out
        after = page["next_after"]


class InboxTest(unittest.TestCase):
    def send(self, n=1):
        marker = str(uuid.uuid4())
        ids = [A.send(B_ID, "message", {"marker": marker, "n": i})["message_id"] for i in range(n)]
        return marker, ids

    def find(self, marker):
        return [e for e in inbox_all(B) if isinstance(e["event"].get("payload"), dict) and e["event"]["payload"].get("marker") == marker]

    def test_messages_are_stored_with_increasing_ids(self):
        marker, ids = self.send(3)
        stored = wait_for("3 stored", lambda: (lambda f: f if len(f) == 3 else None)(self.find(marker)))
        self.assertEqual([e["event"]["message_id"] for e in stored], ids)
        self.assertEqual([e["event"]["event_id"] for e in stored], [e["id"] for e in stored])
        self.assertEqual(sorted(e["id"] for e in stored), [e["id"] for e in stored])
        self.assertEqual(stored[0]["event"]["type"], "message")

    def test_inbox_paging(self):
        marker, _ = self.send(3)
        wait_for("stored", lambda: len(self.find(marker)) == 3)
        first = B.inbox(after=0, limit=1)
        self.assertEqual(len(first["events"]), 1)
        self.assertEqual(first["next_after"], first["events"][0]["id"])
        second = B.inbox(after=first["next_after"], limit=1)
        self.assertGreater(second["events"][0]["id"], first["next_after"])

    def test_stream_carries_ids_and_resumes_after_last_event_id(self):
        with B.events(read_timeout=STEP + 30) as stream:
            stream.connect()
            marker, _ = self.send(3)
            evs = [next_event(stream, is_message(marker)) for _ in range(3)]
        ids = [e.id for e in evs]
        self.assertTrue(all(isinstance(i, int) for i in ids), evs)
        self.assertEqual([e.raw_id for e in evs], [str(i) for i in ids])
        self.assertEqual([e["event_id"] for e in evs], ids)
        # a new stream resuming after the first starts with the second
        with B.events(last_event_id=ids[0]) as resumed:
            self.assertEqual(next_event(resumed, is_message(marker)).id, ids[1])

    def test_new_stream_replays_unacked_then_ack_releases(self):
        marker, _ = self.send(2)
        stored = wait_for("stored", lambda: (lambda f: f if len(f) == 2 else None)(self.find(marker)))
        with B.events() as replay:  # no Last-Event-ID: every unacked durable event
            self.assertEqual(next_event(replay, is_message(marker)).id, stored[0]["id"])
        answer = B.ack(stored[1]["id"])
        self.assertGreaterEqual(answer["acked"], 2)
        self.assertIsInstance(answer["remaining"], int)
        self.assertEqual(self.find(marker), [])
        again = B.ack(stored[1]["id"])
        self.assertEqual(again["acked"], 0)

    def test_auto_ack(self):
        marker, _ = self.send(2)
        with B.events(auto_ack=True) as stream:
            first = next_event(stream, is_message(marker))
            second = next_event(stream, is_message(marker))  # asking for it acks the first
            self.assertEqual(self.find(marker)[0]["id"], second.id)
            stream.close(ack_last=True)
        self.assertGreater(second.id, first.id)
        self.assertEqual(self.find(marker), [])

    def test_ephemeral_events_have_no_id(self):
        # a chunked message: transfer_progress events (ephemeral), then the message
        marker = str(uuid.uuid4())
        with B.events() as stream:
            stream.connect()
            A.send(B_ID, "message", {"marker": marker, "blob": "z" * 70000})
            progress = next_event(stream, lambda e: e.type == "transfer_progress")
            message = next_event(stream, is_message(marker))
        self.assertIsNone(progress.id)
        self.assertIsNone(progress.raw_id)
        self.assertNotIn("event_id", progress.data)
        self.assertIsInstance(message.id, int)


if __name__ == "__main__":
    unittest.main()
