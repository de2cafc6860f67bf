"""Integration (real nodes): tasks and the Agent. Feature ``tasks``.

A delegates to B. Written against /work/spec/issue8-api.md ("Tasks"); fails until the
node has tasks."""

import unittest

from _support import STEP, next_event, require_node, wait_for
from peer_protocol import TERMINAL_STATES, Agent, PeerError


def setUpModule():
    global A, B, A_ID, B_ID
    A, B = require_node("tasks")
    A_ID = A.health()["entity_id"]
    B_ID = B.health()["entity_id"]
    # B's node takes tasks only for skills its card offers.
    B.set_card("sdk-test-agent", skills=["manual", "summarise", "explode"])


def assignee_task(task_id):
    def look():
        try:
            return B.task(task_id)
        except PeerError as e:
            if e.code == "NOT_FOUND":
                return None
            raise

    return wait_for("B has task %s" % task_id, look)


def final(client, task_id):
    return wait_for("task %s finished" % task_id, lambda: (lambda t: t if t["state"] in TERMINAL_STATES else None)(client.task(task_id)))


class TaskRoutesTest(unittest.TestCase):
    """The routes, driven by hand on both sides (no Agent running)."""

    def test_lifecycle(self):
        task_id = A.delegate(B_ID, "manual", {"text": "x"}, deadline_s=300, priority=7)
        mine = A.task(task_id)
        self.assertEqual((mine["role"], mine["peer"], mine["skill"]), ("delegator", B_ID, "manual"))
        self.assertEqual((mine["priority"], mine["input"]), (7, {"text": "x"}))
        self.assertIsInstance(mine["deadline_ms"], int)
        theirs = assignee_task(task_id)
        self.assertEqual((theirs["role"], theirs["peer"], theirs["state"]), ("assignee", A_ID, "submitted"))
        self.assertIn(task_id, [t["task_id"] for t in B.tasks(role="assignee", state="submitted")])
        self.assertNotIn(task_id, [t["task_id"] for t in B.tasks(role="delegator")])
        self.assertEqual(B.set_status(task_id, "working", "on it")["state"], "working")
        wait_for("A sees working", lambda: A.task(task_id)["state"] == "working")
        done = B.complete(task_id, {"summary": "x"}, artifacts=[{"name": "s.txt", "mime_type": "text/plain", "data": "x"}])
        self.assertEqual(done["state"], "completed")
        seen = final(A, task_id)
        self.assertEqual((seen["state"], seen["output"]), ("completed", {"summary": "x"}))
        self.assertEqual(seen["artifacts"][0]["name"], "s.txt")
        with self.assertRaises(PeerError) as cm:
            B.set_status(task_id, "working")
        self.assertEqual((cm.exception.status, cm.exception.code), (409, "INVALID_STATE"))

    def test_cancel(self):
        task_id = A.delegate(B_ID, "manual", None)
        assignee_task(task_id)
        self.assertEqual(A.cancel(task_id)["state"], "canceled")
        wait_for("B sees canceled", lambda: B.task(task_id)["state"] == "canceled")
        with self.assertRaises(PeerError) as cm:
            B.complete(task_id, "too late")
        self.assertEqual(cm.exception.code, "INVALID_STATE")

    def test_task_update_events_on_both_sides(self):
        with A.events(read_timeout=STEP + 30) as a_events, B.events(read_timeout=STEP + 30) as b_events:
            a_events.connect()
            b_events.connect()
            task_id = A.delegate(B_ID, "manual", 1)

            def update(state):
                return lambda e: e.type == "task_update" and e["task"]["task_id"] == task_id and e["task"]["state"] == state

            ev = next_event(b_events, update("submitted"))
            self.assertEqual(ev["task"]["role"], "assignee")
            self.assertIsInstance(ev.id, int)
            self.assertEqual(ev["event_id"], ev.id)
            B.set_status(task_id, "failed", "cannot")
            ev = next_event(a_events, update("failed"))
            self.assertEqual((ev["task"]["role"], ev["task"]["message"]), ("delegator", "cannot"))

    def test_unknown_task(self):
        with self.assertRaises(PeerError) as cm:
            A.task("00000000-0000-4000-8000-000000000000")
        self.assertEqual((cm.exception.status, cm.exception.code), (404, "NOT_FOUND"))


class AgentTest(unittest.TestCase):
    """An Agent serving skills on B; A delegates with delegate_and_wait."""

    @classmethod
    def setUpClass(cls):
        cls.agent = Agent(B, name="sdk-test-agent")

        @cls.agent.skill("summarise")
        def summarise(input):
            words = input["text"].split()
            return {"summary": " ".join(words[:3]), "words": len(words)}

        @cls.agent.skill("explode")
        def explode(input):
            raise ValueError("cannot summarise an explosion")

        cls.thread = cls.agent.start()

    @classmethod
    def tearDownClass(cls):
        cls.agent.stop()
        cls.thread.join(10)

    def test_completed(self):
        task = A.delegate_and_wait(B_ID, "summarise", {"text": "the quick brown fox jumps"}, timeout=STEP)
        self.assertEqual(task["state"], "completed")
        self.assertEqual(task["output"], {"summary": "the quick brown", "words": 5})

    def test_failed(self):
        task = A.delegate_and_wait(B_ID, "explode", {}, timeout=STEP)
        self.assertEqual((task["state"], task["message"]), ("failed", "cannot summarise an explosion"))

    def test_unknown_skill_rejected(self):
        task = A.delegate_and_wait(B_ID, "translate", {}, timeout=STEP)
        self.assertEqual(task["state"], "rejected")
        self.assertIn("unknown skill", task["message"])

    def test_several_at_once(self):
        ids = [A.delegate(B_ID, "summarise", {"text": "n %d" % n}, priority=n % 10) for n in range(5)]
        outs = sorted(final(A, t)["output"]["summary"] for t in ids)
        self.assertEqual(outs, ["n %d" % n for n in range(5)])


if __name__ == "__main__":
    unittest.main()
