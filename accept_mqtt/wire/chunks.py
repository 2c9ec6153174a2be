"""Messages that grow with the model, sent in pieces that fit the broker's size limit.

Mosquitto (MQTT 3.1.1 and 5 alike) acknowledges a publish above its ``message_size_limit``
and delivers it to nobody: the sender cannot tell. A stage's weights and optimizer state
grow with the model, so they never travel as one message: ``split`` cuts a ``Weights``
message's msgpack bytes into ``WeightsChunk`` messages of at most ``limit`` bytes each, and
``Reassembler`` puts them back together and checks them (docs/protocol.md, "Weights").

Guarantees:

* ``split(body, limit)``: every payload it returns is at most ``limit`` bytes (encoded
  chunk, header included), and reassembling them gives back exactly ``encode(body)``.
  A ``limit`` below ``MIN_MESSAGE_BYTES`` raises ``ValueError``.
* ``Reassembler.add(chunk)`` returns the decoded ``Weights`` when the last missing chunk of a
  transfer arrives, after checking that the pieces add up to the announced ``size`` and
  SHA-256; ``None`` while pieces are missing. A chunk that contradicts its transfer (another
  count, size or digest, a ``seq`` out of range, more bytes than announced), a whole message
  of the wrong size or digest, or one that is not a ``Weights`` message raise ``ChunkError``
  naming the transfer and what is wrong; that transfer is dropped, nothing else changes.
  A chunk delivered twice (QoS 1 allows it) is harmless.
* Memory is bounded: one partial transfer per (stage, purpose) (a newer transfer for the same
  replaces it: the sender gave up on the old one), at most ``max_open`` partial transfers
  (the oldest goes first), and a transfer announcing more than ``max_bytes`` is refused.

Pure: imports no MQTT.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field

from .messages import MessageError, Weights, WeightsChunk, decode, encode
from .plan import MIN_MESSAGE_BYTES

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "MIN_MESSAGE_BYTES", "ChunkError", "Reassembler",
           "check_limit", "split"]

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024  # well under Mosquitto's default limit (256 MiB)


class ChunkError(ValueError):
    """A chunk (or a reassembled message) that is not what its transfer announced."""


def check_limit(limit: int) -> int:
    """``limit`` if a chunk can be made to fit it, else ``ValueError`` saying so."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < MIN_MESSAGE_BYTES:
        raise ValueError(f"max_message_bytes must be an int >= {MIN_MESSAGE_BYTES}, got "
                         f"{limit!r}")
    return limit


def split(body: Weights, limit: int) -> list[bytes]:
    """``body`` as encoded ``WeightsChunk`` payloads of at most ``limit`` bytes each."""
    check_limit(limit)
    whole = encode(body)
    head = WeightsChunk(job=body.job, stage=body.stage, purpose=body.purpose,
                        transfer=uuid.uuid4().hex[:16], seq=0, count=1, size=len(whole),
                        sha256=hashlib.sha256(whole).hexdigest(), data=b"")
    # the header's largest encoding: seq and count can be no larger than the size; a bin
    # field's own length prefix is at most 5 bytes
    worst = WeightsChunk(**{**_fields(head), "seq": len(whole), "count": len(whole)})
    room = limit - len(encode(worst)) - 5
    if room < 1:
        raise ValueError(f"max_message_bytes {limit} leaves no room for data after a "
                         f"chunk's header of {len(encode(worst))} bytes")
    pieces = [whole[i:i + room] for i in range(0, len(whole), room)] or [b""]
    return [encode(WeightsChunk(**{**_fields(head), "seq": i, "count": len(pieces),
                                   "data": p}))
            for i, p in enumerate(pieces)]


def _fields(c: WeightsChunk) -> dict[str, object]:
    return {f: getattr(c, f) for f in c.__struct_fields__}


@dataclass
class _Partial:
    transfer: str
    count: int
    size: int
    sha256: str
    parts: dict[int, bytes] = field(default_factory=dict)
    received: int = 0


class Reassembler:
    """Chunks in, whole ``Weights`` out (see the module docstring)."""

    def __init__(self, max_bytes: int = 2**31, max_open: int = 64) -> None:
        self.max_bytes = max_bytes
        self.max_open = max_open
        self._open: dict[tuple[int, str], _Partial] = {}

    @property
    def pending_bytes(self) -> int:
        """Bytes held by partial transfers."""
        return sum(p.received for p in self._open.values())

    def clear(self) -> None:
        self._open.clear()

    def add(self, c: WeightsChunk, topic: str = "") -> Weights | None:
        """The whole message once ``c`` completes it, else None; ``ChunkError`` (a reason
        without the topic: the caller reports both) for a chunk that does not fit."""
        key = (c.stage, c.purpose)
        p = self._open.get(key)
        if p is None or p.transfer != c.transfer:
            self._open.pop(key, None)  # a newer transfer: the sender gave up on the old one
            if not 1 <= c.count <= max(1, c.size) or not 0 <= c.size <= self.max_bytes:
                raise ChunkError(f"transfer {c.transfer} announces {c.count} chunks "
                                 f"of {c.size} bytes in all (at most {self.max_bytes})")
            p = _Partial(c.transfer, c.count, c.size, c.sha256)
            while len(self._open) >= self.max_open:
                self._open.pop(next(iter(self._open)))
            self._open[key] = p
        try:
            if (c.count, c.size, c.sha256) != (p.count, p.size, p.sha256):
                raise ChunkError(f"chunk {c.seq} of transfer {c.transfer} says "
                                 f"{c.count} chunks, {c.size} bytes, sha256 {c.sha256[:12]}..., "
                                 f"its first chunk said {p.count}, {p.size}, {p.sha256[:12]}...")
            if not 0 <= c.seq < p.count:
                raise ChunkError(f"chunk {c.seq} of transfer {c.transfer} is out of "
                                 f"range 0..{p.count - 1}")
            if c.seq not in p.parts:
                p.received += len(c.data)
                p.parts[c.seq] = c.data
            if p.received > p.size:
                raise ChunkError(f"transfer {c.transfer} sent more than its "
                                 f"announced {p.size} bytes")
        except ChunkError:
            self._open.pop(key, None)
            raise
        if len(p.parts) < p.count:
            return None
        del self._open[key]
        whole = b"".join(p.parts[i] for i in range(p.count))
        if len(whole) != p.size:
            raise ChunkError(f"transfer {c.transfer} reassembled to {len(whole)} "
                             f"bytes, announced {p.size}")
        if hashlib.sha256(whole).hexdigest() != p.sha256:
            raise ChunkError(f"transfer {c.transfer} reassembled with another "
                             "SHA-256 than announced (a chunk was altered or mixed up)")
        try:
            return decode(Weights, whole, topic=topic)
        except MessageError as e:
            raise ChunkError(f"transfer {c.transfer} is not a Weights message: "
                             f"{e.reason}") from None
