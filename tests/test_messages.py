"""The message vocabulary: documented field by field, strict about what it knows, round-trips.

docs/protocol.md is what outside clients code against, so every message class of
``accept_mqtt.wire.messages`` must have a heading there (its wire tag and class name) and every
field of it must be in that heading's section; a field added to the code without a line in
the docs fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from accept_mqtt.wire import messages as m

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def _sections(text: str) -> dict[str, str]:
    """Heading line -> the text up to the next heading of any level."""
    parts = re.split(r"^(#{2,4} .*)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _section_of(cls: type[msgspec.Struct], sections: dict[str, str]) -> str:
    tag = m.wire_name(cls)
    for head, body in sections.items():
        if head.startswith("####") and re.search(rf"\b{cls.__name__}\b", head) and (
                tag == cls.__name__ or f"`{tag}`" in head):
            return body
    raise AssertionError(f"docs/protocol.md has no '#### `{tag}` ({cls.__name__})' heading")


@pytest.mark.parametrize("cls", m.message_classes(), ids=lambda c: c.__name__)
def test_every_message_and_field_is_documented(cls: type[msgspec.Struct]) -> None:
    body = _section_of(cls, _sections(DOC.read_text(encoding="utf-8")))
    missing = [f for f in cls.__struct_fields__ if f"`{f}`" not in body]
    assert not missing, f"{cls.__name__}: fields {missing} missing from docs/protocol.md"
    tag_field = cls.__struct_config__.tag_field
    if tag_field is not None:
        assert f'`"{m.wire_name(cls)}"`' in body and f"`{tag_field}`" in body


def test_the_docs_test_notices_a_missing_field() -> None:
    class Extra(m.Ready, tag="ready-x", kw_only=True):
        undocumented_field: int = 0

    sections = _sections(DOC.read_text(encoding="utf-8"))
    with pytest.raises(AssertionError):
        _section_of(Extra, sections)
    body = _section_of(m.Ready, sections)
    assert "`undocumented_field`" not in body


def test_every_wire_tag_is_unique_within_its_union() -> None:
    for union in (m.Event, m.Metric, m.SyncOp):
        tags = [m.wire_name(c) for c in union.__args__]
        assert len(tags) == len(set(tags)), tags


@pytest.mark.parametrize("msg", [
    m.DeviceStatus(state="busy", device="pi-a", time=1.5, job="j1", stage=0),
    m.Rewound(device="pi-a", time=2.0, pv=1, gen=2, stage=1, step=4, ok=False,
              rewind_gen=2, reason="no saved state"),
    m.Stepped(device="pi-c", time=2.5, pv=1, gen=0, step=4, stage=2, busy_ms=9.5, send_ms=1.0,
              bytes_act=0, bytes_grad=640, mbs=4, loss=1.25, correct=50, n=64),
    m.StepMetric(job="j1", time=3.0, step=7, loss=0.5, stage_busy_ms={0: 1.5, 1: 2.0},
                 stages=[m.StageCounters(stage=0, device="pi-a", busy_ms=1.5)]),
    m.Recovered(job="j1", reason="device pi-b went offline", at_step=5, restored_step=3,
                redo_steps=2, action="re-plan from checkpoint", plan_version=2,
                lost=["pi-b"], device="pi-b", devices=["pi-a", "pi-c"]),
    m.Weights(job="j1", stage=1, step=3, purpose="restore", version=2, gen=0,
              tensors={"3.weight": {"shape": [2], "dtype": "float32", "data": b"\0" * 8}}),
    m.Trace(job="j1", device="pi-a", stage=0, step=15,
            spans=[m.Span(kind="send", what="act", mb=0, bytes=10, t0=1.0, t1=1.1)]),
], ids=lambda x: type(x).__name__)
def test_round_trip(msg: msgspec.Struct) -> None:
    kind: object = type(msg)
    for union in (m.Event, m.Metric):
        if type(msg) in union.__args__:
            kind = union  # decoded through its union, as receivers do
    assert m.decode(kind, m.encode(msg)) == msg


@pytest.mark.parametrize("payload, reason", [
    (b"not json", "malformed"),
    (b"[1, 2]", "Expected `object`, got `array`"),
    (b'{"op": "eval", "time": 1.0, "step": 1, "mb": 0, "correct": 1, "n": 2, "loss_sum": 1}',
     "missing required field `device`"),
    (b'{"op": "eval", "device": "a", "time": 1.0, "step": true, "mb": 0, "correct": 1, '
     b'"n": 2, "loss_sum": 1}', "`$.step`"),
    (b'{"op": "bogus", "device": "a", "time": 1.0}', "Invalid value 'bogus' - at `$.op`"),
    (b'{"device": "a", "time": 1.0, "step": 1, "mb": 0}', "missing required field `op`"),
])
def test_a_bad_event_names_what_is_wrong(payload: bytes, reason: str) -> None:
    with pytest.raises(m.MessageError) as e:
        m.decode(m.Event, payload, topic="accept/jobs/j1/events/a")
    assert reason in e.value.reason
    assert str(e.value).startswith("accept/jobs/j1/events/a: ")


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    ev = m.decode(m.Event, b'{"op": "ready", "device": "a", "time": 1, "version": 2, '
                           b'"stage": 0, "added_in_v2": [1]}')
    assert isinstance(ev, m.Ready) and ev.version == 2 and ev.time == 1.0


@pytest.mark.parametrize("payload, reason", [
    (b'{"cmd": "launch"}', "unknown command 'launch'; known: start, pause"),
    (b'{"cmd": "set"}', "set needs act_bits and/or grad_bits"),
    (b'{"cmd": "pause", "act_bits": 8}', "pause takes no act_bits/grad_bits"),
    (b'{"cmd": "set", "act_bits": 8, "lr": 0.1}', "unknown field `lr`"),
    (b'{"cmd": "set", "act_bits": "8"}', "Expected `int | null`, got `str` - at `$.act_bits`"),
    (b'{"cmd": 1}', "at `$.cmd`"),
])
def test_a_bad_control_command_is_refused_with_its_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(m.MessageError) as e:
        m.decode(m.ControlCommand, payload)
    assert reason in e.value.reason


def test_every_control_command_parses() -> None:
    for cmd in m.CONTROL_COMMANDS:
        extra = b', "act_bits": 8' if cmd == "set" else b""
        assert m.decode(m.ControlCommand, b'{"cmd": "%s"%s}' % (cmd.encode(), extra)).cmd == cmd


def test_weights_travel_as_msgpack_and_are_checked() -> None:
    w = m.Weights(job="j1", stage=0, step=1, purpose="checkpoint", version=1,
                  tensors={"0.bias": {"shape": [1], "dtype": "float32", "data": b"\0" * 4}})
    raw = m.encode(w)
    assert msgspec.msgpack.decode(raw)["tensors"]["0.bias"]["data"] == b"\0" * 4
    bad = msgspec.msgpack.encode({**msgspec.to_builtins(w), "purpose": "steal"})
    with pytest.raises(m.MessageError, match="purpose"):
        m.decode(m.Weights, bad)
