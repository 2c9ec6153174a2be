"""The MQTT client accept-mqtt publishes with: aiomqtt's, plus the broker's verdict on a publish.

Guarantees:

* ``Client`` is an ``aiomqtt.Client``; ``Client.publish`` at QoS 1 or 2 raises
  ``PublishRefused`` (an ``aiomqtt.MqttError``, so code that handles a failed publish still
  handles it) when the broker acknowledges the message with a reason code >= 0x80: under
  MQTT 5 a broker says so when it drops a message that breaks its ACL (0x87 *Not
  authorized*) or its size limit (Mosquitto 2.0: 0x95 *Packet too large* for a payload over
  ``message_size_limit``; see ``_let_paho_read_packet_too_large``). Under MQTT 3.1.1 an
  acknowledgement carries no reason code and such a message vanishes without a word; that
  is why ``BrokerUrl`` asks for MQTT 5 unless the URL says ``?protocol=3.1.1``
  (docs/fleet.md).
* The verdict of each publish reaches the task that made it, however many publish at once.
* A publish is written to the socket when it is made, not one event-loop turn later:
  aiomqtt leaves the write to a writer callback the loop runs after its next poll, so a frame
  queued by a stage's compute (which holds the loop) left only after that compute. The
  direct write (paho's ``_packet_write``; ``_write_now``) sends what the socket takes and
  leaves the rest to that callback, which paho registered as before. Measured on the digits
  CNN over loopback: together with the uplink's direct start (``device_agent/link.py``) a
  pipeline's step ran some 10 % faster (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

# The packet id of the publish this task made last: aiomqtt's publish calls paho's
# synchronously, in the caller's task, before it waits for the acknowledgement.
_LAST_MID: contextvars.ContextVar[int] = contextvars.ContextVar("accept_mqtt_last_mid",
                                                                default=-1)


def _let_paho_read_packet_too_large() -> None:
    """Mosquitto 2.0 (Debian 12 ships 2.0.11) answers a publish over its
    ``message_size_limit`` with a PUBACK of reason 0x95 *Packet too large*, a code MQTT 5
    lists for CONNACK and DISCONNECT only. paho 2 takes such a PUBACK for a malformed packet
    and drops the connection, so the publisher would reconnect and send the message again
    instead of hearing why it was dropped. This lets paho read it as the failure it is."""
    names = ReasonCode.names.get(0x95, {})
    types = names.get("Packet too large") if isinstance(names, dict) else None
    if isinstance(types, list) and PacketTypes.PUBACK not in types:
        types.append(PacketTypes.PUBACK)


_let_paho_read_packet_too_large()


class PublishRefused(aiomqtt.MqttError):
    """The broker acknowledged a publish with a failure reason code (MQTT 5)."""

    def __init__(self, topic: str, reason: ReasonCode) -> None:
        self.topic = topic
        self.reason = reason
        self.code = int(reason.value)
        super().__init__(f"the broker refused the message on {topic}: {reason} "
                         f"(MQTT 5 reason code 0x{self.code:02X})")


class Client(aiomqtt.Client):
    """``aiomqtt.Client`` whose ``publish`` raises ``PublishRefused`` (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused: dict[int, ReasonCode] = {}
        paho_publish = self._client.publish

        def publish_and_note_mid(*a: Any, **kw: Any) -> Any:
            info = paho_publish(*a, **kw)
            _LAST_MID.set(info.mid)
            if info.rc == 0:
                self._write_now()
            return info

        self._client.publish = publish_and_note_mid  # type: ignore[method-assign]
        # paho's own writer; absent from a paho whose internals differ: then aiomqtt's
        # writer callback alone sends, one loop turn later, as before
        self._packet_write: Callable[[], Any] | None = getattr(self._client, "_packet_write",
                                                                None)

    def _write_now(self) -> None:
        """Put the queued packets on the socket now, as far as it takes them.

        Not paho's ``loop_write``: that also unregisters the writer, which aiomqtt registers
        only on the loop's next turn, so the writer would stay registered with nothing to
        write and spin (measured: a whole core per idle agent). ``_packet_write`` leaves the
        registration alone; the writer then runs once, finds nothing and unregisters. A
        socket error is left to that writer, which reports it as aiomqtt does."""
        if self._packet_write is None:
            return
        with contextlib.suppress(Exception):
            self._packet_write()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: ReasonCode,
                    properties: Any) -> None:
        # before aiomqtt wakes the publisher, so the verdict is there when it looks
        if reason_code.is_failure:
            self._refused[mid] = reason_code
        super()._on_publish(client, userdata, mid, reason_code, properties)

    async def publish(self, topic: str, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        _LAST_MID.set(-1)
        await super().publish(topic, *args, **kwargs)
        refused = self._refused.pop(_LAST_MID.get(), None)
        if refused is not None:
            raise PublishRefused(topic, refused)
