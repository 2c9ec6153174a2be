"""accept-mqtt: AccEPT pipeline-parallel training across edge devices over MQTT.

The package root imports nothing heavy: the device agent imports the pure parts it needs
(zoo, codec, plan, stage) without pulling in River or the coordinator.
"""

__version__ = "0.1.0"
