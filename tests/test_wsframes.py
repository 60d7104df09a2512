"""gstream encodes unmasked server frames itself (gstream/websocket/frames.py): they
must be exactly what websockets' own serializer produces and parse back
through websockets' Sans-I/O parser, at every length boundary."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from gstream.websocket.frames import BINARY, PING, TEXT, encode_frame, prepare


def _parse(data: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        assert not reader.buffer  # nothing left over
        return frame
    raise AssertionError("frame incomplete")


def test_every_length_boundary_matches_websockets_serializer() -> None:
    for n in (0, 1, 125, 126, 127, 65535, 65536, 70000):
        payload = bytes(i % 251 for i in range(n))
        for opcode, op in ((TEXT, Opcode.TEXT), (BINARY, Opcode.BINARY)):
            ours = encode_frame(opcode, payload)
            assert ours == Frame(op, payload).serialize(mask=False, extensions=[]), n
            frame = _parse(ours)
            assert (frame.opcode, frame.fin, bytes(frame.data)) == (op, True, payload)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_prepared_frames_parse_back_to_the_message(message: str | bytes) -> None:
    frame = _parse(prepare(message).frame)
    if isinstance(message, str):
        assert frame.opcode is Opcode.TEXT and bytes(frame.data).decode() == message
    else:
        assert frame.opcode is Opcode.BINARY and bytes(frame.data) == message


def test_keepalive_ping_frame_matches_websockets_serializer() -> None:
    nonce = (12345).to_bytes(4, "big")
    ours = encode_frame(PING, nonce)
    assert ours == Frame(Opcode.PING, nonce).serialize(mask=False, extensions=[])
    frame = _parse(ours)
    assert (frame.opcode, bytes(frame.data)) == (Opcode.PING, nonce)
