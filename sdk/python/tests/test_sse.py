"""Unit tests of the SSE parser (no node needed)."""

import json
import random
import unittest

import _support  # noqa: F401  (import path)
from peer_protocol import SSEParser


def parse_all(chunks):
    p = SSEParser()
    out = []
    for c in chunks:
        out.extend(p.feed(c))
    return p, out


def split_every(data, n):
    return [data[i : i + n] for i in range(0, len(data), n)]


class SSEParserTest(unittest.TestCase):
    def test_data_and_id(self):
        p, evs = parse_all([b'id: 7\ndata: {"type":"message","n":1}\n\n'])
        self.assertEqual(len(evs), 1)
        self.assertEqual(evs[0].id, 7)
        self.assertEqual(evs[0].raw_id, "7")
        self.assertEqual(evs[0].type, "message")
        self.assertEqual(evs[0].data, {"type": "message", "n": 1})
        self.assertEqual(evs[0]["n"], 1)
        self.assertEqual(p.last_event_id, "7")

    def test_event_without_id_is_ephemeral(self):
        _, evs = parse_all([b'data: {"type":"peer_connected","entity_id":"x"}\n\n'])
        self.assertIsNone(evs[0].id)
        self.assertEqual(evs[0].type, "peer_connected")

    def test_event_id_inside_data(self):
        _, evs = parse_all([b'data: {"type":"task_update","event_id":12,"task":{}}\n\n'])
        self.assertEqual(evs[0].id, 12)
        self.assertIsNone(evs[0].raw_id)

    def test_multi_line_data_joined_with_lf(self):
        text = '{"type":"message",\n "payload": {\n  "a": 1}}'
        wire = "".join("data: %s\n" % line for line in text.split("\n")) + "\n"
        _, evs = parse_all([wire.encode()])
        self.assertEqual(evs[0].raw, text)
        self.assertEqual(evs[0].data, json.loads(text))

    def test_comments_and_keepalives_are_not_events(self):
        p, evs = parse_all([b":\n\n: keep-alive\n\ndata: 1\n\n:\n\n"])
        self.assertEqual([e.data for e in evs], [1])
        self.assertEqual(p.comments, 3)

    def test_crlf_and_cr_line_ends(self):
        for nl in (b"\r\n", b"\r", b"\n"):
            _, evs = parse_all([b"id: 3" + nl + b"data: [1," + nl + b"data: 2]" + nl + nl])
            self.assertEqual(len(evs), 1, nl)
            self.assertEqual(evs[0].raw, "[1,\n2]")
            self.assertEqual(evs[0].id, 3)

    def test_cr_at_chunk_end_then_lf(self):
        # "\r" | "\n" must be one line end, not an empty line (which would dispatch)
        _, evs = parse_all([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"])
        self.assertEqual([e.raw for e in evs], ["a\nb"])

    def test_every_split_gives_the_same_events(self):
        wire = (
            b": hello\r\n\r\n"
            b"id: 1\ndata: {\"type\":\"message\",\"payload\":\"\xc3\xa9t\xc3\xa9 \xe2\x9c\x93\"}\n\n"
            b"data: {\"type\":\"peer_connected\"}\r\rid: 2\r\ndata: {\"type\":\"task_update\",\r\n"
            b"data: \"task\":{}}\r\n\r\n"
            b"retry: 1500\nevent: custom\nid: 3\ndata:nospace\n\n"
        )
        _, want = parse_all([wire])
        self.assertEqual([e.id for e in want], [1, None, 2, 3])
        self.assertEqual(want[0].data["payload"], "\u00e9t\u00e9 \u2713")
        self.assertEqual(want[3].raw, "nospace")
        self.assertEqual(want[3].event, "custom")
        for n in range(1, 12):
            _, got = parse_all(split_every(wire, n))
            self.assertEqual([(e.raw, e.id, e.event) for e in got], [(e.raw, e.id, e.event) for e in want], n)
        rnd = random.Random(8)
        for _ in range(200):
            cuts = sorted(rnd.sample(range(1, len(wire)), rnd.randint(1, 20)))
            chunks = [wire[a:b] for a, b in zip([0] + cuts, cuts + [len(wire)])]
            _, got = parse_all(chunks)
            self.assertEqual([(e.raw, e.id) for e in got], [(e.raw, e.id) for e in want])

    def test_fields(self):
        p, evs = parse_all([b"data\n\ndata:  two spaces\nfoo: ignored\n\nretry: x\nretry: 250\n\n"])
        self.assertEqual([e.raw for e in evs], ["", " two spaces"])
        self.assertEqual(p.retry_ms, 250)

    def test_id_without_data_sets_last_id_only(self):
        p, evs = parse_all([b"id: 41\n\n"])
        self.assertEqual(evs, [])
        self.assertEqual(p.last_event_id, "41")
        p.feed(b"data: x\n\n")
        self.assertEqual(p.last_event_id, "41")

    def test_incomplete_event_is_not_dispatched(self):
        p, evs = parse_all([b"id: 1\ndata: {\"a\":1}\n"])
        self.assertEqual(evs, [])
        self.assertIsNone(p.last_event_id)

    def test_non_numeric_id(self):
        _, evs = parse_all([b"id: abc\ndata: 1\n\n"])
        self.assertIsNone(evs[0].id)
        self.assertEqual(evs[0].raw_id, "abc")

    def test_large_event_in_small_chunks(self):
        blob = "x" * (4 * 1024 * 1024)
        wire = ("id: 9\ndata: " + json.dumps({"type": "message", "payload": {"blob": blob}}) + "\n\n").encode()
        _, evs = parse_all(split_every(wire, 4096))
        self.assertEqual(len(evs), 1)
        self.assertEqual(len(evs[0].data["payload"]["blob"]), len(blob))


if __name__ == "__main__":
    unittest.main()
