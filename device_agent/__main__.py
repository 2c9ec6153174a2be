"""``python -m device_agent --broker mqtt://host:1883 --device-id pi-kitchen`` (also installed
as ``accept-mqtt-agent``).

Settings come from flags, ``ACCEPT_MQTT_*`` variables and a TOML file (``device_agent.config``);
a bad one exits with status 2 and a message naming it. SIGTERM and SIGINT end the agent
cleanly: retained status ``offline`` with reason ``shutdown``, a clean MQTT disconnect (so the
Last Will, reason ``connection lost``, is not fired), exit status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from accept_mqtt.model.hardware import pin_allocator
from accept_mqtt.wire.broker_url import BrokerUrlError
from accept_mqtt.wire.topics import TopicError
from device_agent import config, service
from device_agent.agent import Agent, AgentConfig

log = logging.getLogger("device_agent")


async def _main(cfg: AgentConfig) -> None:
    loop = asyncio.get_running_loop()
    agent = Agent(cfg)
    # Handlers go in before the connection is made: a SIGTERM (systemctl stop) that comes
    # while connecting then also ends with a goodbye rather than the default kill, after
    # which the broker would fire the Last Will ("connection lost").
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, agent.stop)
    async with agent:
        await agent.run()  # returns at once if a signal came while connecting
    # leaving ``async with`` published the retained "offline" status (reason "shutdown")
    # and disconnected cleanly: no Last Will


def main(argv: list[str] | None = None) -> int:
    try:
        args, settings = config.load(argv)
        if args.print_systemd_unit:
            sys.stdout.write(service.systemd_unit())
            return 0
        if args.print_config:
            sys.stdout.write(settings.toml())
            return 0
        cfg = settings.agent_config()
    except (config.SettingError, BrokerUrlError, TopicError) as e:
        print(f"device_agent: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if settings.values["verbose"] else logging.INFO,
                        format="%(asctime)s %(levelname)s agent[%(process)d]: %(message)s")
    # BrokerUrl.client_kwargs reads the password and CA file from the environment at each
    # (re)connect; settings from the TOML file reach it the same way
    os.environ.update(settings.client_env())
    pin_allocator()  # layer times then match the seed the predictor was trained on
    try:
        asyncio.run(_main(cfg))
    except asyncio.CancelledError:
        pass
    except KeyboardInterrupt:
        pass
    except Exception as e:  # aiomqtt.MqttError and friends: say what, not a traceback
        print(f"device_agent: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
