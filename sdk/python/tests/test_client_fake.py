"""Unit tests of Client against an in-process fake node (no node needed)."""

import json
import os
import socket
import tempfile
import unittest

from _support import FakeNode
from peer_protocol import Client, PeerError


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.node = FakeNode()
        self.client = self.node.client(timeout=5)

    def tearDown(self):
        self.node.close()

    def last(self):
        method, path, headers, body = self.node.requests[-1]
        return method, path, headers, json.loads(body) if body else None

    def test_from_data_dir(self):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "api.addr"), "w") as f:
                f.write(self.node.url[len("http://"):] + "\n")
            with open(os.path.join(d, "api-token"), "w") as f:
                f.write(self.node.token + "\n")
            c = Client.from_data_dir(d)
            self.assertEqual(c.base_url, self.node.url)
            self.assertEqual(c.stats()["peers"], {})
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaises(PeerError) as cm:
                Client.from_data_dir(d)
            self.assertEqual(cm.exception.code, "CONNECTION_FAILED")
            self.assertIn("api.addr", cm.exception.message)

    def test_bearer_token_and_basic_routes(self):
        self.assertEqual(self.client.health()["status"], "ok")
        self.assertEqual(self.client.peers(), [])
        _, _, headers, _ = self.last()
        self.assertEqual(headers["Authorization"], "Bearer " + self.node.token)
        peer = self.client.connect("/ip4/127.0.0.1/tcp/1")
        self.assertEqual(self.last()[:2], ("POST", "/v1/peers"))
        self.assertEqual(self.last()[3], {"addr": "/ip4/127.0.0.1/tcp/1"})
        self.assertTrue(peer["connected"])
        self.assertIn("peers", self.client.stats())
        self.assertIn("# EOF", self.client.metrics())

    def test_send_shapes_and_raw_payload(self):
        ans = self.client.send("cd" * 32, "message", {"text": "hi", "n": [1, 2]})
        self.assertIn("message_id", ans)
        self.assertEqual(self.last()[3], {"to": "cd" * 32, "msg_type": "message", "payload": {"text": "hi", "n": [1, 2]}})
        raw = '{ "text" : "kept",  "a":1.50 }'
        self.client.send("cd" * 32, "message", raw_payload=raw)
        body = self.node.requests[-1][3].decode()
        self.assertTrue(body.endswith('"payload":' + raw + "}"), body)
        self.client.send("cd" * 32, "message", None)
        self.assertEqual(self.last()[3]["payload"], None)

    def test_card_routes(self):
        signed = self.client.set_card("summariser", "Summarises", "1.0", skills=["summarise", {"id": "x", "tags": ["t"]}], accepts=["chat"])
        self.assertEqual(signed["card"]["name"], "summariser")
        _, path, _, body = self.last()
        self.assertEqual((path, body["accepts"]), ("/v1/card", ["chat"]))
        self.assertEqual(body["skills"][0], {"id": "summarise", "name": "summarise", "description": "", "tags": [], "input_modes": [], "output_modes": [], "examples": []})
        self.assertEqual(body["skills"][1]["tags"], ["t"])
        self.assertEqual(self.node.requests[-1][0], "PUT")
        self.assertEqual(self.client.card()["card"]["name"], "summariser")
        self.assertIn("defaultInputModes", self.client.agent_card())
        self.assertEqual(self.node.requests[-1][1], "/.well-known/agent-card.json")
        with self.assertRaises(PeerError) as cm:
            self.client.peer_card("ef" * 32)
        self.assertEqual((cm.exception.status, cm.exception.code), (404, "NOT_FOUND"))
        self.assertEqual(self.node.requests[-1][1], "/v1/peers/%s/card" % ("ef" * 32))

    def test_task_routes(self):
        me = self.node.entity_id
        task_id = self.client.delegate(me, "summarise", {"text": "a"}, deadline_s=30, priority=7)
        self.assertEqual(self.last()[3], {"to": me, "skill": "summarise", "input": {"text": "a"}, "deadline_s": 30, "priority": 7})
        self.client.delegate(me, "other", None)
        self.assertEqual(self.last()[3], {"to": me, "skill": "other", "input": None})
        self.assertEqual(self.client.task(task_id)["state"], "submitted")
        waiting = self.client.tasks(role="assignee", state="submitted")
        self.assertEqual(self.node.requests[-1][1], "/v1/tasks?role=assignee&state=submitted")
        self.assertEqual(len(waiting), 2)
        self.assertEqual(len(self.client.tasks()), 4)
        self.assertEqual(self.node.requests[-1][1], "/v1/tasks")
        t = self.client.set_status(task_id, "working", "on it")
        self.assertEqual((t["state"], t["message"]), ("working", "on it"))
        self.assertEqual(self.last()[3], {"state": "working", "message": "on it"})
        self.client.set_status(task_id, "working")
        self.assertEqual(self.last()[3], {"state": "working"})
        t = self.client.complete(task_id, {"summary": "a"}, artifacts=[{"name": "f", "mime_type": "text/plain", "data": "a"}])
        self.assertEqual((t["state"], t["output"]), ("completed", {"summary": "a"}))
        with self.assertRaises(PeerError) as cm:
            self.client.cancel(task_id)
        self.assertEqual((cm.exception.status, cm.exception.code), (409, "INVALID_STATE"))
        with self.assertRaises(PeerError) as cm:
            self.client.task("no-such-task")
        self.assertEqual(cm.exception.code, "NOT_FOUND")

    def test_inbox_routes(self):
        self.node.push({"type": "message", "payload": 1})
        self.node.push({"type": "message", "payload": 2})
        page = self.client.inbox(after=0, limit=1)
        self.assertEqual(self.node.requests[-1][1], "/v1/inbox?after=0&limit=1")
        self.assertEqual([e["id"] for e in page["events"]], [1])
        self.assertEqual(page["next_after"], 1)
        self.assertEqual(self.client.ack(1), {"acked": 1, "remaining": 1})
        self.assertEqual(self.last()[3], {"up_to": 1})

    def test_errors(self):
        bad = Client(self.node.url, "wrong")
        with self.assertRaises(PeerError) as cm:
            bad.stats()
        e = cm.exception
        self.assertEqual((e.status, e.code, e.retry_after_ms), (401, "UNAUTHORIZED", None))
        self.assertIn("UNAUTHORIZED", str(e))
        self.node.fail_next[("POST", "/v1/messages")] = (
            429,
            {"error": {"code": "RATE_LIMITED", "message": "over the task rate limit", "retry_after_ms": 1934}},
            {"Retry-After": "2"},
        )
        with self.assertRaises(PeerError) as cm:
            self.client.send("cd" * 32, "message", {})
        self.assertEqual((cm.exception.status, cm.exception.code, cm.exception.retry_after_ms), (429, "RATE_LIMITED", 1934))
        self.node.fail_next[("GET", "/v1/peers")] = (503, {"error": {"code": "UNAVAILABLE", "message": "busy"}}, {"Retry-After": "1"})
        with self.assertRaises(PeerError) as cm:
            self.client.peers()
        self.assertEqual((cm.exception.code, cm.exception.retry_after_ms), ("UNAVAILABLE", 1000))
        with self.assertRaises(PeerError) as cm:
            self.client.request("GET", "/v1/no-such-route")
        self.assertEqual((cm.exception.status, cm.exception.code), (404, None))
        self.assertIn("may not have this route", cm.exception.message)

    def test_unreachable_node(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        with self.assertRaises(PeerError) as cm:
            Client("127.0.0.1:%d" % port, "t", timeout=2).health()
        self.assertEqual((cm.exception.status, cm.exception.code), (None, "CONNECTION_FAILED"))


if __name__ == "__main__":
    unittest.main()
