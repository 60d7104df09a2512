"""The WHATWG event-stream parser itself, on the standard's own examples."""

import pytest

from gstream.sseparse import EventStreamParser, parse_stream


def test_spec_example_multiline_and_ids():
    raw = b"data: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n"
    evs = parse_stream(raw)
    assert [e.data for e in evs] == ["first event", "second event", " third event"]
    assert [e.last_event_id for e in evs] == ["1", "", ""]


def test_empty_data_buffer_is_not_dispatched():
    assert parse_stream(b"event: x\n\n") == []
    assert parse_stream(b"data\n\n")[0].data == ""


def test_cr_crlf_lf_line_endings_and_split_crlf():
    p = EventStreamParser()
    out = p.feed(b"data: a\r")
    out += p.feed(b"\ndata: b\r\r")
    assert [e.data for e in out] == ["a\nb"]


def test_bom_skipped_once_and_comments_collected():
    p = EventStreamParser()
    evs = p.feed("\ufeff: hi\ndata: x\n\n".encode())
    assert [e.data for e in evs] == ["x"] and p.take_comments() == ["hi"]


def test_retry_digits_only_and_id_with_nul_ignored():
    p = EventStreamParser()
    p.feed(b"retry: 12a\n\nretry: 250\nid: a\0b\ndata: x\n\n")
    assert p.retry == 250 and p.last_event_id == ""


def test_line_limit():
    p = EventStreamParser(max_line=10)
    with pytest.raises(ValueError):
        p.feed(b"data: " + b"x" * 100)
