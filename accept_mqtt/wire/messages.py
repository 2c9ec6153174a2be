"""The message vocabulary: one typed class per JSON or msgpack message on the wire.

Tensor frames have their own module (``codec``: bit-packed payloads) and the plan its own
(``plan``: it validates how stages tile the model); every other payload a device, the
coordinator, a monitor or a user's tool sends is defined here, once, and nowhere else parses
one. docs/protocol.md documents each class under the heading of its wire name, and
``tests/test_messages.py`` checks that every message and every field appears there.

Guarantees:

* ``decode(Kind, payload, topic=...)`` returns a typed message or raises ``MessageError``
  with one specific reason naming the field (``Expected `int`, got `str` - at `$.version```,
  ``Object missing required field `device```, ``Invalid value 'x' - at `$.op```), the topic,
  and nothing else changed. Known fields are checked strictly (a bool is not an int; an int
  is accepted where a float is expected); fields this version does not know are ignored, so
  a newer peer may add keys (docs/protocol.md, "Extensions").
* ``encode(msg)`` is the inverse: JSON for everything but ``Weights`` and ``WeightsChunk``
  (msgpack, because they carry raw tensor bytes). ``decode(type(m), encode(m)) == m`` for
  every message.
* The facts several parts need live here: ``CONTROL_COMMANDS`` and ``SYNC_OPS`` (the ids and
  bit widths live in ``topics`` and ``codec``, the lowest modules that need them).

Why msgspec: its ``Struct`` gives the typed class, the validation with field-naming errors,
and both JSON and msgpack from one definition; decoding an event is 0.29 us against 3.9 us
for ``json.loads`` plus a hand-written check into a dataclass (same machine, 100k runs), and
events cross the coordinator's event loop several times per step.

>>> m = decode(Event, b'{"op": "ready", "device": "pi-a", "time": 1.0, "version": 3, '
...            b'"stage": 0}')
>>> type(m).__name__, m.version
('Ready', 3)
>>> try:
...     decode(Event, b'{"op": "ready", "device": "pi-a", "time": 1.0, "version": "3", '
...            b'"stage": 0}')
... except MessageError as e:
...     print(e.reason)
Expected `int`, got `str` - at `$.version`
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypedDict, TypeVar

import msgspec

__all__ = [
    "CONTROL_COMMANDS", "SYNC_OPS", "Checkpointed", "ControlCommand", "CoordinatorStatus",
    "DeviceProfile", "DeviceStatus", "DoneMetric", "Drift", "Epoch", "Error", "Eval", "Event",
    "JobStatus", "LayerInfo", "MessageError", "Metric", "PackedTensor", "Pong", "Probe",
    "Ready", "Recovered", "Replan", "Restored", "Rewound", "Span", "StageCounters", "StepMetric",
    "Stepped", "SyncOp", "SyncPing", "SyncRewind", "SyncWeights", "TimingSample", "Trace",
    "Weights", "WeightsChunk", "decode", "encode", "message_classes", "peek_request_id",
]

CONTROL_COMMANDS = ("start", "pause", "resume", "stop", "status", "repartition", "set")
SYNC_OPS = ("weights", "rewind", "ping")
# the latest ``Error`` reports a process keeps in memory (an agent's ``errors``, the
# coordinator's record, which also counts them all): a flood of bad input must not grow them
ERRORS_KEPT = 1000


class MessageError(ValueError):
    """A payload that is not the message its topic carries; ``reason`` names the field."""

    def __init__(self, reason: str, topic: str = "") -> None:
        super().__init__(f"{topic + ': ' if topic else 'message rejected: '}{reason}")
        self.reason = reason
        self.topic = topic


class _Msg(msgspec.Struct, kw_only=True):
    """Base of every message: unknown keys are ignored on decode. Every subclass is
    ``kw_only`` too (msgspec applies it per class), so optional fields can come first."""


# -- devices ---------------------------------------------------------------------------
class DeviceStatus(_Msg, kw_only=True):
    """``{root}/devices/{device}/status`` (retained; the Last Will sets ``offline``)."""

    v: int = 1
    state: Literal["online", "busy", "offline"]
    device: str
    time: float
    job: str | None = None
    stage: int | None = None
    reason: str | None = None
    # the agent process that holds the device id (``wire.liveness.instance_id``); a status
    # of another instance tells a reconnecting agent that a twin took its id over
    instance: str | None = None


class DeviceProfile(_Msg, kw_only=True):
    """``{root}/devices/{device}/profile`` (retained): what the planner knows of a device."""

    device: str | None = None
    cores: int
    threads: int
    memory_mb: float
    memory_limit_mb: float | None = None  # what a stage may use (--memory-limit); planned by
    cpu: str
    clock_mhz: float | None = None
    arch: str
    torch: str
    bench_gflops: float | None = None  # matmul GFLOP/s divided by the emulated slowdown
    slowdown: float = 1.0
    bandwidth_bps: float | None = None


# -- liveness (retained, with a Last Will) and twin probes ---------------------------------
class CoordinatorStatus(_Msg, kw_only=True):
    """``{root}/jobs/{job}/coordinator`` (retained): is the job's coordinator there?

    ``alive`` is published on every connect and renewed every ``lease_s / 3`` seconds; the
    Last Will (and nothing else) says ``gone``. Agents leave a job whose coordinator they have
    not heard ``alive`` for ``lease_s`` seconds plus one renewal interval (docs/faults.md)."""

    v: int = 1
    state: Literal["alive", "gone"]
    job: str
    owner: str  # the coordinator process (``wire.liveness.instance_id``)
    time: float  # when published (the Will's: when its connection was opened)
    lease_s: float
    reason: str | None = None


class Probe(_Msg, kw_only=True):
    """``{root}/devices/{device}/probe`` and ``{root}/jobs/{job}/probe``: "is anyone holding
    this id?" (``answer`` false), and the holder's reply with the same ``nonce``."""

    nonce: str
    answer: bool = False
    holder: str | None = None  # the answering process (its ``instance``/``owner``)


# -- agents' events (agent -> coordinator) -----------------------------------------------
class _Event(_Msg, tag_field="op", kw_only=True):
    device: str
    time: float
    pv: int | None = None  # plan version the sender runs (absent: current)
    gen: int | None = None  # its rewind generation within that plan (absent: current)


class Ready(_Event, tag="ready", kw_only=True):
    version: int
    stage: int


class Stepped(_Event, tag="stepped", kw_only=True):
    """A stage finished every backward of ``step`` and applied its optimizer step.

    The counters are cumulative since the agent joined the job. The last stage's carries the
    step's training loss (summed over its micro-batches, each scaled by 1/bsz), correct
    predictions and samples; the others leave them out. One event per stage per step: the
    coordinator ends a step on the first and the last stage's (earlier versions sent a
    ``loss`` and a ``done`` event per micro-batch)."""

    step: int
    stage: int
    busy_ms: float
    send_ms: float
    bytes_act: int
    bytes_grad: int
    mbs: int  # micro-batches of this step the stage computed
    loss: float | None = None
    correct: int | None = None
    n: int | None = None


class Eval(_Event, tag="eval", kw_only=True):
    step: int
    mb: int
    correct: int
    n: int
    loss_sum: float


class Pong(_Event, tag="pong", kw_only=True):
    stage: int
    step: int


class Rewound(_Event, tag="rewound", kw_only=True):
    stage: int
    step: int
    ok: bool
    rewind_gen: int
    reason: str | None = None


class Restored(_Event, tag="restored", kw_only=True):
    stage: int
    step: int
    version: int


class Progress(_Event, tag="progress", kw_only=True):
    """A stage's heartbeat, every ``every`` seconds while its agent holds a job, except while
    a compute has made no progress since the last one (a stalled compute says nothing, so
    the coordinator can tell it from a slow one, docs/faults.md)."""

    stage: int
    step: int
    ticks: int  # compute progress so far (work items, layers, slices of emulated slowness)
    every: float  # seconds between heartbeats


Event = Ready | Stepped | Eval | Pong | Rewound | Restored | Progress


# -- sync (coordinator -> agents) ------------------------------------------------------
class _Sync(_Msg, tag_field="op", kw_only=True):
    pass


class SyncWeights(_Sync, tag="weights", kw_only=True):
    optim: bool = False


class SyncRewind(_Sync, tag="rewind", kw_only=True):
    step: int
    gen: int


class SyncPing(_Sync, tag="ping", kw_only=True):
    pass


SyncOp = SyncWeights | SyncRewind | SyncPing


# -- control (a user -> coordinator) ---------------------------------------------------
RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class ControlCommand(_Msg, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """``{root}/jobs/{job}/control``. Unknown keys are refused here: a typo in a command must
    not be silently dropped. Only ``set`` takes ``act_bits``/``grad_bits``. ``request_id``
    (optional, the sender's choice) comes back in the reply, so a sender takes only its own
    reply for the answer."""

    cmd: str
    act_bits: int | None = None
    grad_bits: int | None = None
    request_id: RequestId | None = None

    def __post_init__(self) -> None:
        if self.cmd not in CONTROL_COMMANDS:
            raise ValueError(f"unknown command {self.cmd!r}; known: "
                             f"{', '.join(CONTROL_COMMANDS)}")
        has_bits = self.act_bits is not None or self.grad_bits is not None
        if self.cmd == "set" and not has_bits:
            raise ValueError("set needs act_bits and/or grad_bits")
        if self.cmd != "set" and has_bits:
            raise ValueError(f"{self.cmd} takes no act_bits/grad_bits")


# -- metrics (coordinator and agents -> anyone) -----------------------------------------
class _Metric(_Msg, tag_field="type", kw_only=True):
    job: str | None = None
    time: float | None = None


class StageCounters(_Msg, kw_only=True):
    """Cumulative counters of one stage since its agent joined the job."""

    stage: int
    device: str | None = None
    busy_ms: float = 0.0
    send_ms: float = 0.0
    bytes_act: int = 0
    bytes_grad: int = 0


class StepMetric(_Metric, tag="step", kw_only=True):
    step: int
    epoch: int | None = None
    loss: float | None = None
    train_acc: float | None = None
    samples_per_s: float | None = None
    step_ms: float | None = None
    total_steps: int | None = None
    plan_version: int | None = None
    stage_busy_ms: dict[int, float] = {}
    stages: list[StageCounters] = []


class Epoch(_Metric, tag="epoch", kw_only=True):
    epoch: int
    step: int
    test_accuracy: float
    test_loss: float
    samples_per_s: float


class DoneMetric(_Metric, tag="done", kw_only=True):
    final_accuracy: float | None = None
    samples_per_s: float


class Error(_Metric, tag="error", kw_only=True):
    """A message a device (or the coordinator, ``device: "coordinator"``) rejected; the
    refusal of a control command carries the command's ``request_id`` (when it had one).

    An agent's refusal of a plan it could read carries that plan's ``plan_version`` (and
    ``plan_owner``): only such an error refuses the coordinator's plan; a payload on the plan
    topic that is no plan at all carries neither, and is just bad input. ``suppressed``: the
    coordinator's rejections are rate-limited; a summary says how many were not published
    one by one, and on which topics (``suppressed_topics``, at most 10). ``resync``: a delta
    frame's history did not match (``pv``/``gen`` say of which plan and rewind generation)."""

    device: str
    topic: str
    reason: str
    request_id: str | None = None
    plan_version: int | None = None
    plan_owner: str | None = None
    suppressed: int | None = None
    suppressed_topics: list[str] | None = None
    # a delta frame's history did not match (wire/delta.py): the histories of the link are
    # out of step, the step cannot finish; the coordinator rewinds it at once if ``pv`` and
    # ``gen`` (the stage's plan version and rewind generation) are its current ones
    resync: bool | None = None
    pv: int | None = None
    gen: int | None = None


class Checkpointed(_Metric, tag="checkpoint", kw_only=True):
    step: int
    path: str


class Replan(_Metric, tag="replan", kw_only=True):
    reason: str
    changed: bool
    step: int
    plan_version: int | None = None
    stages: list[dict[str, Any]] | None = None


class Recovered(_Metric, tag="recovered", kw_only=True):
    reason: str
    at_step: int
    restored_step: int
    redo_steps: int
    action: Literal["rewind", "re-plan from checkpoint"]
    plan_version: int
    lost: list[str] | None = None
    device: str | None = None
    devices: list[str] | None = None


class Drift(_Metric, tag="drift", kw_only=True):
    device: str
    step: int
    speed_factor: float
    vs_model: float
    error: float | None = None
    partition_moves: bool
    action: str


class JobStatus(_Metric, tag="status", kw_only=True):
    """The answer to an accepted control command (with the command's ``request_id``)."""

    command: str | None = None
    request_id: str | None = None
    step: int
    epoch: int
    paused: bool
    stopping: bool
    plan_version: int | None = None
    devices: list[str] = []


Metric = StepMetric | Epoch | DoneMetric | Error | Checkpointed | Replan | Recovered | Drift | (
    JobStatus)


# -- timing samples (agent -> coordinator) -----------------------------------------------
class LayerInfo(_Msg, kw_only=True):
    """A layer's descriptor as it travels (``model.descriptors.LayerDescriptor``)."""

    index: int
    type: str
    flops: int
    params: int
    in_elems: int
    out_elems: int
    kernel: int
    stride: int
    in_channels: int
    out_channels: int


class TimingSample(_Msg, kw_only=True):
    """One (layer, direction, micro-batch size) of one optimizer step: the mean of ``n``."""

    layer: LayerInfo
    dir: Literal["fwd", "bwd"]
    batch: int
    ms: float
    threads: int
    n: int = 1


# -- weights (msgpack, both ways) ------------------------------------------------------
class PackedTensor(TypedDict):
    shape: list[int]
    dtype: str
    data: bytes


class Weights(_Msg, kw_only=True):
    """``{root}/jobs/{job}/weights/{k}``: a stage's tensors named as in the whole model."""

    v: int = 1
    job: str
    stage: int
    step: int
    purpose: Literal["checkpoint", "restore"]
    version: int
    gen: int = 0
    tensors: dict[str, PackedTensor]
    optim: dict[str, PackedTensor] | None = None


class WeightsChunk(_Msg, kw_only=True):
    """``{root}/jobs/{job}/weights/{k}``: one piece of a msgpack ``Weights`` message.

    A broker drops a publish above its ``message_size_limit`` after acknowledging it, so a
    ``Weights`` message (it grows with the model) travels as ``count`` chunks of at most the
    plan's ``max_message_bytes`` each (``wire.chunks``). ``stage`` and ``purpose`` repeat the
    whole message's, so a receiver skips what is not for it without reassembling it."""

    v: int = 1
    job: str
    stage: int
    purpose: Literal["checkpoint", "restore"]
    transfer: str  # the whole message's id: every chunk of it carries the same
    seq: int  # 0 .. count-1: the chunk's place in the whole message
    count: int
    size: int  # bytes of the whole message
    sha256: str  # hex SHA-256 of the whole message
    data: bytes


# -- trace (agent -> anyone, opt-in) ---------------------------------------------------
class Span(_Msg, omit_defaults=True, kw_only=True):
    kind: Literal["fwd", "bwd", "opt", "send"]
    mb: int
    t0: float
    t1: float
    what: str | None = None  # send only: act | grad
    bytes: int | None = None  # send only


class Trace(_Msg, kw_only=True):
    v: int = 1
    job: str
    device: str
    stage: int
    step: int
    clock: Literal["unix"] = "unix"
    spans: list[Span]


# -- encode / decode -------------------------------------------------------------------
M = TypeVar("M")

_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()
_decoders: dict[Any, msgspec.json.Decoder[Any] | msgspec.msgpack.Decoder[Any]] = {}
_MSGPACK = (Weights, WeightsChunk)  # they carry raw tensor bytes


def _decoder(kind: Any) -> msgspec.json.Decoder[Any] | msgspec.msgpack.Decoder[Any]:
    dec = _decoders.get(kind)
    if dec is None:
        dec = (msgspec.msgpack.Decoder(kind) if kind in _MSGPACK else msgspec.json.Decoder(kind))
        _decoders[kind] = dec
    return dec


def decode(kind: type[M] | Any, payload: bytes | str, *, topic: str = "") -> M:
    """``payload`` as a ``kind`` message (a class here, a union such as ``Event``, or
    ``list[TimingSample]``); ``MessageError`` naming the field otherwise."""
    try:
        return _decoder(kind).decode(payload)  # type: ignore[no-any-return]
    except msgspec.DecodeError as e:  # ValidationError is a DecodeError
        raise MessageError(str(e), topic) from None


def encode(msg: Any) -> bytes:
    """JSON bytes of a message (msgpack for ``Weights`` and its chunks); lists of messages
    too."""
    if isinstance(msg, _MSGPACK):
        return _msgpack_encoder.encode(msg)
    return _json_encoder.encode(msg)


def peek_request_id(payload: bytes | str) -> str | None:
    """The ``request_id`` of a control command that does not decode as one (an unknown key,
    a bad value), if it has a usable one: so that even its refusal reaches its sender."""
    try:
        body = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return None
    rid = body.get("request_id") if isinstance(body, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 64 else None


def to_builtins(msg: Any) -> Any:
    """Plain dicts and lists (for records, the predictor and JSON dumps of the run)."""
    return msgspec.to_builtins(msg)


def message_classes() -> list[type[msgspec.Struct]]:
    """Every concrete message class (what the documentation test walks)."""
    out: list[type[msgspec.Struct]] = []
    for name in __all__:
        obj = globals()[name]
        if isinstance(obj, type) and issubclass(obj, msgspec.Struct):
            out.append(obj)
    return out


def wire_name(cls: type[msgspec.Struct]) -> str:
    """The tag a message carries (``op``/``type`` value), else its class name."""
    tag = cls.__struct_config__.tag
    return tag if isinstance(tag, str) else cls.__name__
