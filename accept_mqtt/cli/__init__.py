"""The ``accept-mqtt`` command line.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them, importing a module when its command runs so
``accept-mqtt --help`` stays fast and a device without River can still run the agent.

The plain ``pip install accept-mqtt`` is the device agent's; the commands here need the
``coordinator`` extra (``NEEDS``). A command run without the packages of its extra stops
before doing anything, with exit status 2 and a message naming the extra to install; a
module of an extra first imported later (a lazy import) is reported the same way.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

# command -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("accept_mqtt.cli.train", "train a model pipeline-parallel over MQTT"),
    "control": ("accept_mqtt.cli.control", "send a control command to a running job"),
    "monitor": ("accept_mqtt.cli.monitor", "live view of devices and jobs on a broker"),
    "dashboard": ("accept_mqtt.cli.dashboard", "serve a read-only live page of a broker's jobs"),
    "profile": ("accept_mqtt.planning.profiling",
                "measure the zoo's layers here to seed the predictor"),
    "broker": ("broker.cli", "run Mosquitto or manage its credentials and ACL"),
}

BENCHES: dict[str, tuple[str, str]] = {
    "codec": ("accept_mqtt.bench.codec", "codec throughput, ratio and error"),
    "accuracy": ("accept_mqtt.bench.accuracy", "held-out accuracy at fp32, 8, 4, 2 bits"),
    "predictor": ("accept_mqtt.bench.predictor", "latency predictor MAPE and learning curve"),
    "partition": ("accept_mqtt.bench.partition", "partitioner vs baselines, predicted"),
    "e2e": ("accept_mqtt.bench.e2e", "end-to-end speed-up on an emulated cluster"),
    "overhead": ("accept_mqtt.bench.overhead", "accept-mqtt vs torch pipelining vs one process"),
    "chaos": ("accept_mqtt.bench.chaos", "one job under random faults: survived, replayed, "
              "accuracy, memory"),
    "memory": ("accept_mqtt.bench.memory", "peak RSS of coordinator, agents and broker"),
}


# top-level module -> the extra (pyproject's optional-dependencies) whose package provides it
EXTRA_MODULES: dict[str, str] = {"river": "coordinator", "sklearn": "coordinator",
                                 "rich": "coordinator", "matplotlib": "plot"}
# command (or "bench") -> the extra it cannot start without; unlisted: the plain install
NEEDS: dict[str, str] = {"train": "coordinator", "monitor": "coordinator",
                         "profile": "coordinator", "bench": "coordinator"}


class MissingExtra(RuntimeError):
    def __init__(self, command: str, extra: str, module: str) -> None:
        super().__init__(f"'accept-mqtt {command}' needs the {extra!r} extra (module "
                         f"{module!r} is not installed): pip install 'accept-mqtt[{extra}]'")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: blocked (sys.modules[name] is None)
        return False


def check_extra(command: str) -> None:
    """Raise ``MissingExtra`` if a module of the extra ``command`` needs is not importable."""
    extra = NEEDS.get(command)
    for module, of in EXTRA_MODULES.items():
        if of == extra and not _importable(module):
            raise MissingExtra(command, extra, module)


def _missing_extra(command: str, e: ModuleNotFoundError) -> MissingExtra | None:
    root = (e.name or "").split(".")[0]
    return MissingExtra(command, EXTRA_MODULES[root], root) if root in EXTRA_MODULES else None


def _add(sub: argparse._SubParsersAction, name: str, module: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description=help_)
    p.set_defaults(_module=module)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = _missing_extra(name, e)
        if missing is not None:
            p.set_defaults(_missing=str(missing))
            return
        if e.name and module.startswith(e.name):
            p.set_defaults(_missing=f"'{name}' is not available in this build ({module} missing)")
            return
        raise
    mod.add_arguments(p)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accept-mqtt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only import the module of the command actually asked for (torch/river imports are slow).
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in COMMANDS.items():
        if name == wanted:
            _add(sub, name, module, help_)
        else:
            sub.add_parser(name, help=help_, add_help=False)
    bench = sub.add_parser("bench", help="benchmarks that print a table and write JSON")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    bwanted = argv[argv.index("bench") + 1] if wanted == "bench" and len(argv) > argv.index(
        "bench") + 1 else None
    for name, (module, help_) in BENCHES.items():
        if name == bwanted:
            _add(bsub, name, module, help_)
        else:
            bsub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:  # before parsing: a command whose module cannot load has no flags to parse
        check_extra(next((a for a in argv if not a.startswith("-")), ""))
    except MissingExtra as e:
        print(f"accept-mqtt: {e}", file=sys.stderr)
        return 2
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if getattr(args, "_missing", None):
            print(f"accept-mqtt: {args._missing}", file=sys.stderr)
            return 2
        mod = importlib.import_module(args._module)
        return int(mod.run(args) or 0)
    except MissingExtra as e:
        print(f"accept-mqtt: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        missing = _missing_extra(args.command, e)
        if missing is None:
            raise
        print(f"accept-mqtt: {missing}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("accept-mqtt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
