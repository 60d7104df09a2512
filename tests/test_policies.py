"""Policy and state enums: members and their strings are interchangeable; bad values are named."""

from __future__ import annotations

import json

import pytest

from gstream import HubConfig, WSConfig
from gstream.policies import InboundOverflow, Overflow, SlowPolicy
from gstream.replay import History, ReplayStatus


def test_configs_take_members_or_strings_and_normalise() -> None:
    assert HubConfig(slow_policy="close").slow_policy is SlowPolicy.CLOSE
    assert HubConfig(slow_policy=SlowPolicy.DROP_NEWEST).slow_policy == "drop_newest"
    assert WSConfig(inbound_overflow="drop").inbound_overflow is InboundOverflow.DROP
    assert Overflow("reject") is Overflow.REJECT


def test_bad_values_raise_a_value_error_naming_the_choices() -> None:
    with pytest.raises(ValueError, match=r"slow_policy must be one of 'drop_oldest', 'drop_newest', "
                                         r"'close', got 'block'"):
        HubConfig(slow_policy="block")
    with pytest.raises(ValueError, match="inbound_overflow must be one of 'pause', 'drop', 'close'"):
        WSConfig(inbound_overflow="explode")


def test_members_print_and_serialise_as_their_values() -> None:
    h = History(4, None)
    h.append(1, "1", "", b"x")
    status = h.since("nope").status
    assert status is ReplayStatus.UNKNOWN and status == "unknown"
    assert (str(status), f"{status}", json.dumps({"r": status})) == ("unknown", "unknown", '{"r": "unknown"}')
