"""Unit tests of Agent and delegate_and_wait against a fake node (no node needed).

The fake node serves tasks delegated to its own entity id on both sides, so one
node stands for delegator and assignee."""

import time
import unittest

from _support import FakeNode, wait_for
from peer_protocol import Agent, PeerError, Reject, Result


class AgentTest(unittest.TestCase):
    def setUp(self):
        self.node = FakeNode()
        self.client = self.node.client(timeout=5)
        self.agent = Agent(self.client, name="test-agent")
        calls = self.calls = []

        @self.agent.skill("summarise", description="First words")
        def summarise(input):
            calls.append(input)
            return {"summary": " ".join(input["text"].split()[:2])}

        @self.agent.skill("with_task")
        def with_task(input, task):
            return {"task_id": task["task_id"], "input": input}

        @self.agent.skill("boom")
        def boom(input):
            raise RuntimeError("the model is down")

        @self.agent.skill("picky")
        def picky(input):
            raise Reject("input too long")

        @self.agent.skill("files")
        def files(input):
            return Result({"n": 1}, artifacts=[{"name": "a.txt", "mime_type": "text/plain", "data": "hello"}])

        self.thread = None

    def tearDown(self):
        self.agent.stop()
        if self.thread is not None:
            self.thread.join(5)
        self.node.close()

    def start(self):
        self.thread = self.agent.start()

    def delegate(self, skill, input):
        task_id = self.client.delegate(self.node.entity_id, skill, input)
        return task_id

    def final(self, task_id):
        return wait_for(
            "task %s finished" % task_id,
            lambda: (lambda t: t if t["state"] in ("completed", "failed", "rejected", "canceled") else None)(self.client.task(task_id)),
            timeout=5,
        )

    def test_serves_a_skill(self):
        self.start()
        task = self.final(self.delegate("summarise", {"text": "one two three"}))
        self.assertEqual((task["state"], task["output"]), ("completed", {"summary": "one two"}))
        states = [e["task"]["state"] for _, e in self.node.durable if e["task"]["role"] == "assignee"]
        self.assertEqual(states, ["submitted", "working", "completed"])

    def test_handler_with_task_argument_and_artifacts(self):
        self.start()
        tid = self.delegate("with_task", [1, 2])
        self.assertEqual(self.final(tid)["output"], {"task_id": tid, "input": [1, 2]})
        task = self.final(self.delegate("files", None))
        self.assertEqual(task["artifacts"], [{"name": "a.txt", "mime_type": "text/plain", "data": "hello"}])

    def test_failure_reject_and_unknown_skill(self):
        self.start()
        failed = self.final(self.delegate("boom", {}))
        self.assertEqual((failed["state"], failed["message"]), ("failed", "the model is down"))
        rejected = self.final(self.delegate("picky", {}))
        self.assertEqual((rejected["state"], rejected["message"]), ("rejected", "input too long"))
        unknown = self.final(self.delegate("translate", {}))
        self.assertEqual(unknown["state"], "rejected")
        self.assertIn("unknown skill 'translate'", unknown["message"])
        self.assertIn("summarise", unknown["message"])

    def test_acks_handled_events(self):
        self.start()
        self.final(self.delegate("summarise", {"text": "a b c"}))
        # every durable event up to the last one the agent read gets acknowledged
        wait_for("acked", lambda: self.node.acked >= self.node.next_id - 2, timeout=5)

    def test_each_task_served_once_across_reconnects(self):
        self.node.drop_after = 1
        self.node.honour_resume = False  # replays: the agent must not serve twice
        self.agent.client = self.client
        self.start()
        ids = [self.delegate("summarise", {"text": "x %d" % n}) for n in range(3)]
        for tid in ids:
            self.assertEqual(self.final(tid)["state"], "completed")
        time.sleep(0.2)
        self.assertEqual(len(self.calls), 3)

    def test_waiting_tasks_are_served_at_start(self):
        tid = self.delegate("summarise", {"text": "early bird"})
        self.client.ack(self.node.next_id - 1)  # events gone: only the task list knows
        self.start()
        self.assertEqual(self.final(tid)["output"], {"summary": "early bird"})

    def test_publish_card(self):
        signed = self.agent.publish_card(accepts=["chat"])
        card = signed["card"]
        self.assertEqual(card["name"], "test-agent")
        self.assertEqual([s["id"] for s in card["skills"]], ["summarise", "with_task", "boom", "picky", "files"])
        self.assertEqual(card["skills"][0]["description"], "First words")

    def test_delegate_and_wait_by_events(self):
        self.start()
        task = self.client.delegate_and_wait(self.node.entity_id, "summarise", {"text": "p q r"}, timeout=5)
        self.assertEqual(task["output"], {"summary": "p q"})
        self.assertEqual(task["role"], "delegator")

    def test_delegate_and_wait_polls_without_events(self):
        self.node.fail_next[("GET", "/v1/events")] = (404, None, {})
        # no agent: the test finishes the task itself, seen only by polling
        me = self.node.entity_id
        import threading

        def finish():
            tid = wait_for("a task", lambda: self.client.tasks(role="assignee"), timeout=5)[0]["task_id"]
            self.client.complete(tid, "done")

        threading.Thread(target=finish, daemon=True).start()
        task = self.client.delegate_and_wait(me, "anything", None, timeout=5, poll_interval=0.05)
        self.assertEqual((task["state"], task["output"]), ("completed", "done"))

    def test_delegate_and_wait_times_out_and_cancels(self):
        start = time.monotonic()
        with self.assertRaises(TimeoutError) as cm:
            self.client.delegate_and_wait(self.node.entity_id, "summarise", {}, timeout=0.5, cancel_on_timeout=True)
        self.assertLess(time.monotonic() - start, 3)
        self.assertIn("submitted", str(cm.exception))
        canceled = [t for t in self.node.tasks.values() if t["state"] == "canceled"]
        self.assertEqual(len(canceled), 2)

    def test_start_raises_if_the_node_refuses(self):
        agent = Agent(self.node.client(timeout=5))
        agent.client.token = "wrong"
        with self.assertRaises(PeerError):
            agent.start()


if __name__ == "__main__":
    unittest.main()
