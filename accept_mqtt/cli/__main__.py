"""``python -m accept_mqtt.cli``: the same as the ``accept-mqtt`` command."""

import sys

from . import main

sys.exit(main())
