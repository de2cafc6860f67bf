"""Integration (real nodes): capability cards. Feature ``cards``.

Written against /work/spec/issue8-api.md ("Capability card"); fails until the node
has cards."""

import unittest
import uuid

from _support import require_node, wait_for
from peer_protocol import PeerError


def setUpModule():
    global A, B, A_ID, B_ID
    A, B = require_node("cards")
    A_ID = A.health()["entity_id"]
    B_ID = B.health()["entity_id"]


SKILL = {"id": "summarise", "name": "Summarise", "description": "Summarises text", "tags": ["text"], "input_modes": ["application/json"], "output_modes": ["application/json"], "examples": ["summarise this"]}


class CardsTest(unittest.TestCase):
    def test_set_and_get_own_card(self):
        name = "agent-" + uuid.uuid4().hex[:8]
        signed = B.set_card(name, "A test agent", "0.1.0", skills=[SKILL], accepts=["chat"])
        card = signed["card"]
        self.assertTrue(signed["signature"])
        self.assertEqual((card["name"], card["description"], card["version"]), (name, "A test agent", "0.1.0"))
        self.assertEqual(card["entity_id"], B_ID)
        self.assertEqual(card["skills"][0]["id"], "summarise")
        self.assertEqual(card["accepts"], ["chat"])
        self.assertIn("1.2", card["protocol_versions"])
        for field in ("public_key", "message_types", "crypto", "limits", "issued_at_ms", "sequence"):
            self.assertIn(field, card)
        got = B.card()
        self.assertEqual(got["card"]["name"], name)
        self.assertEqual(got["card"]["sequence"], card["sequence"])
        again = B.set_card(name, "changed", "0.1.1", skills=[SKILL])
        self.assertGreater(again["card"]["sequence"], card["sequence"])

    def test_well_known_agent_card(self):
        B.set_card("a2a-view", "A2A form", "1.0", skills=[SKILL])
        a2a = B.agent_card()
        self.assertEqual(a2a["name"], "a2a-view")
        self.assertIn("defaultInputModes", a2a)
        self.assertIn("defaultOutputModes", a2a)
        self.assertIn("capabilities", a2a)
        skill = a2a["skills"][0]
        self.assertEqual(skill["id"], "summarise")
        self.assertIn("inputModes", skill)
        self.assertIn("outputModes", skill)

    def test_peer_card(self):
        name = "peer-view-" + uuid.uuid4().hex[:8]
        B.set_card(name, "seen from A", "1.0", skills=[SKILL])
        card = wait_for("A knows B's new card", lambda: (lambda c: c if c["card"]["name"] == name else None)(A.peer_card(B_ID)))
        self.assertEqual(card["card"]["entity_id"], B_ID)
        self.assertTrue(card["signature"])

    def test_card_updated_event(self):
        with A.events() as stream:
            stream.connect()
            B.set_card("evented-" + uuid.uuid4().hex[:8], "", "1.0", skills=[SKILL])
            from _support import next_event

            ev = next_event(stream, lambda e: e.type == "card_updated" and e.get("entity_id") == B_ID)
        self.assertIsNone(ev.id)  # ephemeral
        self.assertIsInstance(ev["sequence"], int)

    def test_unknown_peer_card(self):
        with self.assertRaises(PeerError) as cm:
            A.peer_card("00" * 31 + "02")
        self.assertEqual((cm.exception.status, cm.exception.code), (404, "NOT_FOUND"))


if __name__ == "__main__":
    unittest.main()
