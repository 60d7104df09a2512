"""atheris fuzz target for the SSE encoder and the WHATWG parser.

Run (not in CI): ``bash fuzz/run.sh sse`` (installs atheris into .venv).

Properties checked on every input:
* the parser never raises on arbitrary bytes (other than its documented
  ValueError for an over-long line);
* encoding an event built from the input and parsing it back yields exactly
  one event with the scrubbed data, and no injected field.
"""

import sys

import atheris

with atheris.instrument_imports():
    from gstream.events import Event, EventType, encode
    from gstream.sseparse import EventStreamParser


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512))
    parser = EventStreamParser(max_line=4096)
    try:
        parser.feed(raw)
    except ValueError:
        pass
    text = fdp.ConsumeUnicodeNoSurrogates(256)
    name = fdp.ConsumeUnicodeNoSurrogates(32)
    ident = fdp.ConsumeUnicodeNoSurrogates(32)
    frame = encode(Event(data=text, type=EventType.CUSTOM, name=name, id=ident))
    p = EventStreamParser()
    events = p.feed(frame)
    assert len(events) == 1
    assert events[0].data == text.replace("\r", "").replace("\0", "")
    assert p.retry is None


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
