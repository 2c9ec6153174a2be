"""Real link shaping for the local cluster: network namespaces, veth pairs, a bridge and ``tc``.

One run gets its own little network::

    root namespace             broker namespace ({prefix}-brk)         agent namespaces
    coordinator ── {prefix}c ═══ pc ─┐                                   ({prefix}-a0, ...)
      (unshaped)                     br0 (broker address .1) ─ p0 ═══ up0  tbf rate = uplink
                                     └──────────────────────── p1 ═══ up0  tbf rate = uplink

Each agent's *egress* (its uplink, ``up0`` inside its namespace) is shaped by a ``tbf`` qdisc
at its bandwidth; the broker's and the coordinator's links are not shaped. With ``delay_ms``
(a one-way latency; needs the kernel's ``sch_netem``, which ``available().delay`` probes) a
``netem`` delay sits on every agent's uplink (above its ``tbf``) and on the coordinator's
egress, so every hop of a step (coordinator -> stage 0, stage -> stage through the broker,
events back) pays it once. Where the kernel has no ``sch_netem``, ``delay_ms`` is refused
(``NetemError``) and latency is emulated in user space instead (``wire.aio.DelayLine``, used
by the agents' ``--latency`` and ``bench e2e``).

Mosquitto runs in the broker namespace and each agent via ``ip netns exec``, so every frame
an agent publishes really crosses its shaped link.

Guarantees:

* ``available()`` says whether this works here (root, ``ip netns``, ``tc``, a ``tbf`` qdisc on
  a veth) by trying it on a throw-away namespace, and if not, why.
* ``ShapedNetwork`` is a context manager: names carry a per-run prefix (``ax{pid}n{k}`` by
  default, at most 15 characters for interface names); on entry it first removes leftovers of
  crashed earlier runs (namespaces and root interfaces whose prefix names a dead process, or
  that carry this run's own prefix), killing processes still inside them; on exit, also on
  ``KeyboardInterrupt`` and ``SIGTERM``, it kills whatever still runs in its namespaces and
  deletes them and the root-side interface, so nothing is left behind.
* ``ShapedCluster`` is a ``LocalCluster`` whose broker and agents live in those namespaces;
  agents advertise their ``--bandwidth`` in their profile but do not pace (``--no-pace``):
  the kernel shapes.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from accept_mqtt.wire.broker_url import parse_bandwidth
from broker import MosquittoBroker

from .local import AgentSpec, LocalCluster

_LOCK = Path("/run/accept-mqtt-netem.lock")
_OWNED = re.compile(r"^(ax(\d+)n\d+)(-|c$)")  # names this module creates: ax{pid}n{k}...
_counter = itertools.count()


class NetemError(RuntimeError):
    pass


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        if Path(d, name).is_file():
            return str(Path(d, name))
    return None


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    ip = _tool(args[0]) or args[0]
    p = subprocess.run([ip, *args[1:]], capture_output=True, text=True, timeout=20)
    if check and p.returncode != 0:
        raise NetemError(f"{' '.join(args)}: {(p.stderr or p.stdout).strip()}")
    return p


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str  # what works, or why not
    delay: bool = False  # sch_netem present: ShapedNetwork(delay_ms=...) works

    def __bool__(self) -> bool:
        return self.ok


_cached: Availability | None = None


def available(refresh: bool = False) -> Availability:
    """Whether namespaces + veth + ``tbf`` work here; probed once on a throw-away namespace."""
    global _cached
    if _cached is not None and not refresh:
        return _cached
    _cached = _probe()
    return _cached


def _probe() -> Availability:
    if os.name != "posix" or not Path("/proc/net").exists():
        return Availability(False, "not Linux")
    if os.geteuid() != 0:
        return Availability(False, "needs root (ip netns / tc)")
    for tool in ("ip", "tc"):
        if _tool(tool) is None:
            return Availability(False, f"'{tool}' not found (apt-get install iproute2)")
    ns = f"ax{os.getpid()}n{next(_counter)}-probe"
    try:
        _run("ip", "netns", "add", ns)
    except (NetemError, OSError, subprocess.SubprocessError) as e:
        return Availability(False, f"cannot create a network namespace: {e}")
    try:
        _run("ip", "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        _run("ip", "-n", ns, "link", "add", "b0", "type", "bridge")
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "v0", "root", "tbf",
             "rate", "8mbit", "burst", "16kb", "limit", "64kb")
        netem = _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "v1", "root",
                     "netem", "delay", "1ms", check=False).returncode == 0
    except (NetemError, OSError, subprocess.SubprocessError) as e:
        return Availability(False, f"veth/bridge/tbf do not work here: {e}")
    finally:
        _run("ip", "netns", "del", ns, check=False)
    return Availability(True, "root, ip netns, veth, bridge, tc tbf" +
                        (", netem" if netem else " (no sch_netem: delay unavailable)"), netem)


# -- cleanup ---------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.strip()]


def _root_links() -> list[str]:
    out = _run("ip", "-o", "link", "show", check=False).stdout
    return [m.group(1) for m in re.finditer(r"^\d+:\s+([^:@\s]+)", out, re.M)]


def _kill_namespace(ns: str) -> None:
    """SIGKILL every process inside ``ns`` (ours: only this module creates such names)."""
    pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
    for p in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(p), signal.SIGKILL)
    deadline = time.monotonic() + 3
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(int(p))]
        time.sleep(0.02)


def _belongs(name: str, prefix: str) -> bool:
    """Names of one run: ``{prefix}-brk``, ``{prefix}-a{i}`` (namespaces), ``{prefix}c``."""
    return name.startswith(prefix + "-") or name == prefix + "c"


def remove_prefix(prefix: str) -> list[str]:
    """Delete the namespaces and the root interface of the run ``prefix``; returns names."""
    gone = []
    for ns in _namespaces():
        if _belongs(ns, prefix):
            _kill_namespace(ns)
            _run("ip", "netns", "del", ns, check=False)
            gone.append(ns)
    for link in _root_links():
        if _belongs(link, prefix):
            _run("ip", "link", "del", link, check=False)
            gone.append(link)
    return gone


def remove_stale() -> list[str]:
    """Delete leftovers of crashed runs: names ``ax{pid}n...`` whose process is dead."""
    gone = []
    names = set(_namespaces()) | set(_root_links())
    dead = {m.group(1) for n in names if (m := _OWNED.match(n)) and not _alive(int(m.group(2)))}
    for prefix in sorted(dead):
        gone += remove_prefix(prefix)
    return gone


@contextlib.contextmanager
def _setup_lock() -> Iterator[None]:
    """One set-up at a time on this machine (subnet choice and stale cleanup race otherwise)."""
    with open(_LOCK, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that no root-namespace address or route overlaps."""
    out = _run("ip", "-4", "-o", "addr", "show", check=False).stdout + \
        _run("ip", "-4", "route", "show", check=False).stdout
    used = [ipaddress.ip_network(m, strict=False)
            for m in re.findall(r"(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", out)]
    start = os.getpid() % 250
    for i in range(256):
        net = ipaddress.ip_network(f"10.213.{(start + i) % 256}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetemError("no free /24 in 10.213.0.0/16 for the shaped network")


# -- the network -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    name: str
    namespace: str
    address: str
    rate_bps: float | None


class ShapedNetwork:
    """A broker namespace with a bridge, one shaped namespace per endpoint, and a root veth.

    ``endpoints`` maps a name (an agent's device id) to its uplink in bits/s (None: unshaped).
    """

    def __init__(self, endpoints: Sequence[tuple[str, float | None]], *,
                 delay_ms: float | None = None, prefix: str | None = None) -> None:
        if not endpoints:
            raise ValueError("a shaped network needs at least one endpoint")
        self.prefix = prefix or f"ax{os.getpid()}n{next(_counter)}"
        if len(self.prefix) + 1 > 15:
            raise ValueError(f"prefix {self.prefix!r} too long for interface names")
        self.delay_ms = delay_ms
        self._wanted = list(endpoints)
        self.broker_ns = f"{self.prefix}-brk"
        self.root_if = f"{self.prefix}c"
        self.endpoints: dict[str, Endpoint] = {}
        self.broker_ip = ""
        self.coordinator_ip = ""
        self._prev_sigterm: Any = None
        self._up = False

    def exec_prefix(self, name: str | None = None) -> list[str]:
        """Command prefix that runs a program in ``name``'s namespace (None: the broker's)."""
        ns = self.broker_ns if name is None else self.endpoints[name].namespace
        return [_tool("ip") or "ip", "netns", "exec", ns]

    def __enter__(self) -> ShapedNetwork:
        ok = available()
        if not ok:
            raise NetemError(f"tc shaping unavailable: {ok.reason}")
        if self.delay_ms is not None and not self.delay_ms >= 0:
            raise NetemError(f"delay_ms must be >= 0, got {self.delay_ms}")
        if self.delay_ms and not ok.delay:
            raise NetemError(f"delay_ms needs the sch_netem kernel module, absent here "
                             f"({ok.reason}); emulate latency in user space instead")
        with _setup_lock():
            remove_stale()
            remove_prefix(self.prefix)
            self._install_signal()
            atexit.register(self.close)
            try:
                self._build()
            except BaseException:
                self.close()
                raise
        self._up = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        net = _free_subnet()
        hosts = list(net.hosts())
        self.broker_ip, self.coordinator_ip = str(hosts[0]), str(hosts[1])
        mask = net.prefixlen
        b = self.broker_ns
        _run("ip", "netns", "add", b)
        _run("ip", "-n", b, "link", "set", "lo", "up")
        _run("ip", "-n", b, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", b, "addr", "add", f"{self.broker_ip}/{mask}", "dev", "br0")
        _run("ip", "-n", b, "link", "set", "br0", "up")
        # coordinator: root namespace <-> bridge, unshaped
        _run("ip", "link", "add", self.root_if, "type", "veth", "peer", "name", "pc", "netns", b)
        _run("ip", "-n", b, "link", "set", "pc", "master", "br0", "up")
        _run("ip", "addr", "add", f"{self.coordinator_ip}/{mask}", "dev", self.root_if)
        _run("ip", "link", "set", self.root_if, "up")
        if self.delay_ms:  # the coordinator's sends pay the one-way latency too
            _run("tc", "qdisc", "add", "dev", self.root_if, "root", "netem", "delay",
                 f"{self.delay_ms}ms")
        for i, (name, rate) in enumerate(self._wanted):
            ns = f"{self.prefix}-a{i}"
            addr = str(hosts[9 + i])
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "add", "up0", "type", "veth", "peer", "name", f"p{i}",
                 "netns", b)
            _run("ip", "-n", b, "link", "set", f"p{i}", "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{addr}/{mask}", "dev", "up0")
            _run("ip", "-n", ns, "link", "set", "up0", "up")
            if rate or self.delay_ms:
                self._shape(ns, "up0", rate)
            self.endpoints[name] = Endpoint(name, ns, addr, rate)

    def _shape(self, ns: str, dev: str, rate_bps: float | None) -> None:
        """``tbf`` at ``rate_bps`` on ``dev``'s egress, under a ``netem`` delay if asked."""
        tc = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev]
        if self.delay_ms:
            _run(*tc, "root", "handle", "1:", "netem", "delay", f"{self.delay_ms}ms")
        if not rate_bps:
            return
        rate = f"{int(rate_bps)}bit"
        # 1 ms of tokens (>= 3 full frames): a frame of tens of kB is never let through in
        # one burst faster than the rate
        burst = max(int(rate_bps / 8 * 0.001), 3 * 1514)
        limit = max(int(rate_bps / 8 * 0.5), 256 * 1024)  # deep: local TCP is never dropped
        where = ["parent", "1:1", "handle", "10:"] if self.delay_ms else ["root"]
        _run(*tc, *where, "tbf", "rate", rate, "burst", str(burst), "limit", str(limit))

    def qdiscs(self) -> dict[str, str]:
        """``tc qdisc show`` of every endpoint's uplink (what the kernel really applies)."""
        return {name: _run("ip", "netns", "exec", e.namespace, "tc", "qdisc", "show", "dev",
                           "up0", check=False).stdout.strip()
                for name, e in self.endpoints.items()}

    def close(self) -> None:
        """Kill what runs inside, delete namespaces and the root interface; idempotent."""
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if self._prev_sigterm is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, self._prev_sigterm)
            self._prev_sigterm = None
        remove_prefix(self.prefix)
        self._up = False

    def leftovers(self) -> list[str]:
        """Namespaces and root interfaces of this run that still exist (empty after close)."""
        return [n for n in _namespaces() + _root_links() if _belongs(n, self.prefix)]

    def _install_signal(self) -> None:
        """SIGTERM raises KeyboardInterrupt (main thread, default handler only), so ``with``
        blocks unwind and clean up as on Ctrl-C."""
        try:
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                self._prev_sigterm = signal.signal(signal.SIGTERM, _sigterm)
        except ValueError:  # not the main thread
            self._prev_sigterm = None


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- the cluster -----------------------------------------------------------------------------
class ShapedCluster(LocalCluster):
    """``LocalCluster`` with Mosquitto and every agent in its own namespace, links shaped by
    ``tc``. ``url`` is the broker's address on the bridge, reachable from this namespace."""

    BROKER_PORT = 1883

    def __init__(self, agents: list[AgentSpec], *, root: str = "accept",
                 workdir: str | Path | None = None, delay_ms: float | None = None,
                 prefix: str | None = None) -> None:
        self.net = ShapedNetwork([(a.device_id, parse_bandwidth(a.bandwidth)) for a in agents],
                                 delay_ms=delay_ms, prefix=prefix)
        wd = Path(workdir or tempfile.mkdtemp(prefix="accept-shaped-"))
        # the broker's address is known once the network exists (__enter__ sets host)
        brk = MosquittoBroker(host="127.0.0.1", port=self.BROKER_PORT, workdir=wd / "broker",
                              command_prefix=self.net.exec_prefix())
        super().__init__(agents, broker=brk, root=root, workdir=wd)

    def agent_cmd(self, spec: AgentSpec) -> list[str]:
        cmd = self.net.exec_prefix(spec.device_id) + super().agent_cmd(spec)
        return cmd + ["--no-pace"] if spec.bandwidth else cmd

    def __enter__(self) -> ShapedCluster:
        self.net.__enter__()
        try:
            self.broker.host = self.net.broker_ip
            self.broker.start()
            super().__enter__()
        except BaseException:
            self.broker.cleanup()
            self.net.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)  # agents first (the broker is not LocalCluster's to stop)
            self.broker.cleanup()
        finally:
            self.net.close()
