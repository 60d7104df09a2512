"""The SSE encoder: exact frames, injection resistance, and properties
checked against the WHATWG parser in gstream.sseparse."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gstream import Event, EventType, encode, encode_comment, encode_retry, json_event
from gstream.sseparse import EventStreamParser, parse_stream


def test_message_has_no_event_line():
    assert encode(Event(data="hello")) == b"data: hello\n\n"


def test_error_done_custom_frames():
    assert encode(Event(type=EventType.ERROR, data="fail")) == b"event: error\ndata: fail\n\n"
    assert encode(Event(type=EventType.DONE, data="[DONE]")) == b"event: done\ndata: [DONE]\n\n"
    assert encode(Event(type=EventType.CUSTOM, name="update", data="payload")) == (
        b"event: update\ndata: payload\n\n"
    )


def test_name_alone_makes_a_custom_event():
    assert Event(name="tick", data="1").type is EventType.CUSTOM
    assert encode(Event(name="tick", data="1")) == b"event: tick\ndata: 1\n\n"


def test_id_comes_first():
    assert encode(Event(data="hi", id="99")) == b"id: 99\ndata: hi\n\n"


def test_multiline_data():
    assert encode(Event(data="a\nb\nc")) == b"data: a\ndata: b\ndata: c\n\n"


def test_empty_and_trailing_newline_data():
    assert encode(Event(data="")) == b"data: \n\n"
    assert encode(Event(data="x\n")) == b"data: x\ndata: \n\n"
    assert parse_stream(encode(Event(data="x\n")))[0].data == "x\n"


def test_cr_is_dropped_and_crlf_breaks_line():
    assert encode(Event(data="a\rb")) == b"data: ab\n\n"
    assert encode(Event(data="a\r\nb")) == b"data: a\ndata: b\n\n"


@pytest.mark.parametrize("bad", ["\n", "\r", "\0", "\r\n"])
def test_id_injection_is_truncated(bad):
    frame = encode(Event(data="x", id=f"42{bad}event: forged"))
    assert b"forged" not in frame and b"\0" not in frame
    assert frame == b"id: 42\ndata: x\n\n"


def test_id_empty_after_truncation_writes_no_id_line():
    # An empty id: line would reset the browser's last event id.
    assert encode(Event(data="x", id="\nevil")) == b"data: x\n\n"


@pytest.mark.parametrize("bad", ["\n", "\0", "\r"])
def test_custom_name_injection_is_truncated(bad):
    frame = encode(Event(type=EventType.CUSTOM, name=f"update{bad}data: forged", data="x"))
    assert b"data: forged" not in frame and b"\0" not in frame
    assert frame.startswith(b"event: update\n")


def test_unicode_line_separators_are_not_line_breaks():
    frame = encode(Event(data="a\u2028b\u0085c", name="n\u2029x"))
    events = parse_stream(frame)
    assert len(events) == 1 and events[0].data == "a\u2028b\u0085c"
    assert events[0].event == "n\u2029x"


def test_lone_surrogates_are_replaced_not_raised():
    frame = encode(Event(data="a\ud800b", id="\udfff1"))
    ev = parse_stream(frame)[0]
    assert ev.data == "a?b" or ev.data == "a\ufffdb"


def test_bytes_data_is_decoded():
    assert encode(Event(data=b"caf\xc3\xa9")) == "data: café\n\n".encode()


def test_data_must_be_text():
    with pytest.raises(TypeError):
        Event(data=123)  # type: ignore[arg-type]


def test_retry_and_comment_frames():
    assert encode_retry(3000) == b"retry: 3000\n\n"
    assert encode_retry(0) == b"" and encode_retry(-5) == b""
    assert encode_comment("ping") == b": ping\n\n"
    assert encode_comment("a\r\nSet-Cookie: x") == b": a\n\n"
    assert encode(Event(data="x", retry=0)) == b"data: x\n\n"
    assert encode(Event(data="x", retry=1500)) == b"retry: 1500\ndata: x\n\n"


def test_json_event():
    ev = json_event({"a": [1, "é"]}, name="obj", id="7")
    frame = encode(ev)
    parsed = parse_stream(frame)[0]
    assert json.loads(parsed.data) == {"a": [1, "é"]}
    assert parsed.event == "obj" and parsed.last_event_id == "7"


def test_event_type_str():
    assert [str(t) for t in EventType] == ["message", "error", "done", "custom"]


# -- properties -------------------------------------------------------------

text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | st.lists(
    st.sampled_from(["\r", "\n", "\0", "a", " ", ":", "é", "\u2028", "data: x", "id: 9"]),
    max_size=30,
).map("".join)


@settings(max_examples=400, deadline=None)
@given(data=text, name=text, ident=st.none() | text)
def test_encode_roundtrips_through_whatwg_parser(data, name, ident):
    ev = Event(data=data, type=EventType.CUSTOM, name=name, id=ident)
    frame = encode(ev)
    parser = EventStreamParser()
    events = parser.feed(frame)
    assert len(events) == 1, frame
    got = events[0]
    assert got.data == data.replace("\r", "").replace("\0", "")
    expected_name = name.split("\r")[0].split("\n")[0].split("\0")[0]
    assert got.event == (expected_name or "message")
    if ident is not None:
        expected_id = ident.split("\r")[0].split("\n")[0].split("\0")[0]
        assert got.last_event_id == expected_id
    # No injected retry or second event.
    assert parser.retry is None
    assert frame.endswith(b"\n\n") and b"\r" not in frame and b"\0" not in frame


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(text, min_size=1, max_size=8), split=st.integers(1, 7))
def test_stream_of_events_parses_whatever_the_chunking(frames, split):
    raw = b"".join(encode(Event(data=d, id=str(i))) for i, d in enumerate(frames))
    parser = EventStreamParser()
    got = []
    for i in range(0, len(raw), split):
        got.extend(parser.feed(raw[i : i + split]))
    assert [e.data for e in got] == [d.replace("\r", "").replace("\0", "") for d in frames]
    assert [e.last_event_id for e in got] == [str(i) for i in range(len(frames))]


@settings(max_examples=200, deadline=None)
@given(text)
def test_comment_never_injects(t):
    parser = EventStreamParser()
    assert parser.feed(encode_comment(t)) == []
