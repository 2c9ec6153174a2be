"""A minimal third-party monitor: print step, loss and samples/s of one accept-mqtt job.

Needs only paho-mqtt (``pip install "paho-mqtt>=2"``), nothing from accept-mqtt::

    python examples/monitor_min.py j1 --broker 127.0.0.1 --port 1883

It subscribes to ``{root}/jobs/{job}/metrics`` (JSON, one object per message with a
``type``), prints one line per ``step``, ``epoch``, ``error`` and ``done`` message, and exits
after ``done``. It never publishes. See docs/monitoring.md for every topic and payload.
"""

from __future__ import annotations

import argparse
import json
import uuid

import paho.mqtt.client as mqtt


def describe(msg: dict) -> str | None:
    """One line for a metrics message, or None for types this script does not print."""
    kind = msg.get("type")
    if kind == "step":
        return (f"step {msg['step']}/{msg.get('total_steps')} epoch {msg.get('epoch')} "
                f"loss {msg['loss']:.4f} {msg['samples_per_s']:.0f} samples/s")
    if kind == "epoch":
        return f"epoch {msg['epoch']} test accuracy {msg['test_accuracy']:.4f}"
    if kind == "error":
        return f"error: {msg.get('device')} rejected {msg.get('topic')}: {msg.get('reason')}"
    if kind == "done":
        return f"done: final accuracy {msg.get('final_accuracy')}"
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("job")
    p.add_argument("--broker", default="127.0.0.1", help="host name of the broker")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--root", default="accept")
    args = p.parse_args()
    topic = f"{args.root}/jobs/{args.job}/metrics"

    # A random client id and a clean session: any number of monitors can watch at once.
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"monitor-min-{uuid.uuid4().hex[:8]}", clean_session=True)

    def on_connect(c: mqtt.Client, userdata: object, flags: object, rc: object,
                   props: object) -> None:
        c.subscribe(topic, qos=0)  # (re)subscribe on every (re)connect

    def on_subscribe(c: mqtt.Client, userdata: object, mid: int, rcs: object,
                     props: object) -> None:
        print(f"watching {topic}", flush=True)

    def on_message(c: mqtt.Client, userdata: object, m: mqtt.MQTTMessage) -> None:
        try:
            msg = json.loads(m.payload)
            if not isinstance(msg, dict):
                return
            line = describe(msg)
        except (ValueError, KeyError, TypeError):
            return  # not ours to judge: skip what does not parse
        if line:
            print(line, flush=True)
        if msg.get("type") == "done":
            c.disconnect()

    client.on_connect, client.on_subscribe, client.on_message = (on_connect, on_subscribe,
                                                                 on_message)
    client.connect(args.broker, args.port, keepalive=30)
    try:
        client.loop_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
