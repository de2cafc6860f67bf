"""Unit tests of EventStream (resume, dedup, auto-ack, backoff) against a fake node."""

import threading
import time
import unittest

from _support import FakeNode, next_event
from peer_protocol import PeerError


def take(stream, n, timeout=10.0):
    """The next n events that have data (read in a thread, bounded)."""
    out = []
    done = threading.Event()
    err = []

    def read():
        try:
            for ev in stream:
                out.append(ev)
                if len(out) == n:
                    break
        except BaseException as e:  # noqa: B902
            err.append(e)
        finally:
            done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(timeout):
        stream.close()
        raise AssertionError("got %d of %d events: %r" % (len(out), n, out))
    if err:
        raise err[0]
    return out


class EventStreamTest(unittest.TestCase):
    def setUp(self):
        self.node = FakeNode()
        self.client = self.node.client(timeout=5)

    def tearDown(self):
        self.node.close()

    def test_backlog_then_live_events(self):
        self.node.push({"type": "message", "payload": "old"})
        with self.client.events() as stream:
            stream.connect()
            self.assertTrue(stream.wait_connected(1))
            self.node.push({"type": "peer_connected", "entity_id": "x"})
            self.node.push({"type": "message", "payload": "new"})
            evs = take(stream, 3)
        self.assertEqual([(e.id, e.type) for e in evs], [(1, "message"), (None, "peer_connected"), (2, "message")])
        self.assertEqual(evs[2]["payload"], "new")
        self.assertEqual(self.node.last_event_ids, [None])

    def test_keepalives_are_skipped(self):
        self.node.keepalive = 0.02
        with self.client.events() as stream:
            stream.connect()
            time.sleep(0.2)
            self.node.push({"type": "message", "payload": 1})
            self.assertEqual(take(stream, 1)[0]["payload"], 1)

    def test_resume_after_disconnect_with_last_event_id(self):
        for n in range(5):
            self.node.push({"type": "message", "payload": n})
        self.node.drop_after = 2
        stream = self.client.events(backoff_initial=0.01)
        evs = take(stream, 5)
        stream.close()
        self.assertEqual([e["payload"] for e in evs], [0, 1, 2, 3, 4])
        self.assertEqual([e.id for e in evs], [1, 2, 3, 4, 5])
        self.assertEqual(self.node.last_event_ids[:3], [None, "2", "4"])
        self.assertGreaterEqual(stream.connects, 3)
        self.assertEqual(stream.last_event_id, 5)

    def test_start_after_given_id(self):
        for n in range(3):
            self.node.push({"type": "message", "payload": n})
        with self.client.events(last_event_id=2) as stream:
            self.assertEqual(take(stream, 1)[0]["payload"], 2)
        self.assertEqual(self.node.last_event_ids, ["2"])

    def test_repeats_are_skipped(self):
        # a node that ignores Last-Event-ID replays everything unacked: no repeats
        self.node.honour_resume = False
        for n in range(2):
            self.node.push({"type": "message", "payload": n})
        self.node.drop_after = 2
        stream = self.client.events(backoff_initial=0.01)
        evs = take(stream, 2)
        self.node.drop_after = None
        for n in range(2, 4):
            self.node.push({"type": "message", "payload": n})
        evs += take(stream, 2)
        stream.close()
        self.assertEqual([e.id for e in evs], [1, 2, 3, 4])
        self.assertGreaterEqual(self.node.streams_opened, 2)

    def test_auto_ack_after_handling(self):
        for n in range(3):
            self.node.push({"type": "message", "payload": n})
        stream = self.client.events(auto_ack=True)
        it = iter(stream)
        first = next(it)
        self.assertEqual(first.id, 1)
        self.assertEqual(self.node.acked, 0)  # not handled yet
        second = next(it)  # asking for the next one = the first was handled
        self.assertEqual(second.id, 2)
        self.assertEqual(self.node.acked, 1)
        stream.close()
        self.assertEqual(self.node.acked, 1)  # the event being handled is not acked by close
        stream2 = self.client.events(auto_ack=True)
        self.assertEqual(next(iter(stream2)).id, 2)  # redelivered
        stream2.close(ack_last=True)
        self.assertEqual(self.node.acked, 2)

    def test_ephemeral_events_are_not_acked(self):
        stream = self.client.events(auto_ack=True)
        stream.connect()
        self.node.push({"type": "peer_connected", "entity_id": "x"})
        self.node.push({"type": "message", "payload": 1})
        self.node.push({"type": "peer_disconnected", "entity_id": "x"})
        take(stream, 3)
        stream.close()
        acks = [r for r in self.node.requests if r[1] == "/v1/inbox/ack"]
        self.assertEqual(len(acks), 1)
        self.assertEqual(self.node.acked, 1)

    def test_close_from_another_thread_ends_iteration(self):
        stream = self.client.events()
        stream.connect()
        ended = threading.Event()

        def read():
            for _ in stream:
                pass
            ended.set()

        threading.Thread(target=read, daemon=True).start()
        time.sleep(0.1)
        stream.close()
        self.assertTrue(ended.wait(3))

    def test_unauthorized_is_raised_not_retried(self):
        stream = self.node.client(timeout=5)
        stream.token = "wrong"
        with self.assertRaises(PeerError) as cm:
            next(iter(stream.events()))
        self.assertEqual(cm.exception.code, "UNAUTHORIZED")

    def test_unavailable_is_retried_after_retry_after(self):
        self.node.fail_next[("GET", "/v1/events")] = (503, {"error": {"code": "UNAVAILABLE", "message": "too many event streams", "retry_after_ms": 50}}, {"Retry-After": "1"})
        self.node.push({"type": "message", "payload": 1})
        with self.client.events() as stream:
            start = time.monotonic()
            ev = next_event(stream, lambda e: e.type == "message")
        self.assertEqual(ev["payload"], 1)
        self.assertGreaterEqual(time.monotonic() - start, 0.04)

    def test_gives_up_after_max_retries(self):
        self.node.close()
        stream = self.client.events(max_retries=2, backoff_initial=0.01)
        with self.assertRaises(PeerError) as cm:
            next(iter(stream))
        self.assertEqual(cm.exception.code, "CONNECTION_FAILED")

    def test_lagged_resyncs_from_last_id(self):
        self.node.push({"type": "message", "payload": 1})
        stream = self.client.events(backoff_initial=0.01)
        stream.connect()
        self.assertEqual(take(stream, 1)[0].id, 1)
        self.node.push({"type": "lagged", "missed": 3}, durable=False)
        self.assertEqual(take(stream, 1)[0].type, "lagged")
        self.node.push({"type": "message", "payload": 2})
        self.assertEqual(take(stream, 1)[0]["payload"], 2)
        stream.close()
        self.assertEqual(self.node.last_event_ids, [None, "1"])


if __name__ == "__main__":
    unittest.main()
