"""Real ``tc`` shaping in network namespaces: the rate holds and nothing is left behind.

Skipped (with the reason) where namespaces or ``tc`` are unavailable: not root, no iproute2,
or a kernel without veth/bridge/tbf.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from accept_mqtt.harness import netem

_ok = netem.available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"tc shaping unavailable here: {_ok.reason}")

_RECEIVER = """
import json, socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); n = 0; t0 = t1 = None
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    t1 = time.monotonic(); t0 = t0 or t1; n += len(b)
print(json.dumps({"bytes": n, "seconds": t1 - t0}), flush=True)
"""

_SENDER = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
c.sendall(b"x" * int(sys.argv[3])); c.close()
"""


def _bulk(net: netem.ShapedNetwork, sender: str, nbytes: int) -> float:
    """Bits/s of one TCP transfer from ``sender``'s namespace to the broker namespace."""
    port = "5001"
    rx = subprocess.Popen(net.exec_prefix() + [sys.executable, "-c", _RECEIVER, net.broker_ip,
                                               port], stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout is not None
        assert rx.stdout.readline().strip() == "ready"
        subprocess.run(net.exec_prefix(sender) + [sys.executable, "-c", _SENDER, net.broker_ip,
                                                  port, str(nbytes)], check=True, timeout=30)
        res = json.loads(rx.stdout.readline())
        rx.wait(10)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    assert res["bytes"] == nbytes
    return res["bytes"] * 8 / res["seconds"]


def test_tbf_shapes_uplink_and_cleanup_leaves_nothing() -> None:
    rate = 8e6
    with netem.ShapedNetwork([("slow", rate), ("free", None)]) as net:
        prefix = net.prefix
        assert "tbf" in net.qdiscs()["slow"]
        measured = _bulk(net, "slow", 2_500_000)  # about 2.5 s at 8 Mbit/s
        assert 0.5 * rate <= measured <= 1.3 * rate, f"{measured / 1e6:.2f} Mbit/s at 8 Mbit/s"
        unshaped = _bulk(net, "free", 2_500_000)
        assert unshaped > 3 * rate, f"unshaped link only {unshaped / 1e6:.1f} Mbit/s"
        assert net.leftovers()
    assert net.leftovers() == []
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert prefix not in names and prefix not in links


def test_leftovers_of_a_crashed_run_are_removed() -> None:
    prefix = f"axt{os.getpid()}"  # not another test run's
    before = signal.getsignal(signal.SIGTERM)
    net = netem.ShapedNetwork([("a", 8e6)], prefix=prefix)
    net.__enter__()  # as if the process died here: no __exit__
    assert net.leftovers()
    with netem.ShapedNetwork([("a", 8e6)], prefix=prefix) as again:
        assert len(again.leftovers()) == 3  # broker ns, agent ns, root veth: one set only
    assert again.leftovers() == []
    net.close()  # restores the SIGTERM handler the "crashed" run installed
    assert signal.getsignal(signal.SIGTERM) == before


def test_interrupt_cleans_up() -> None:
    with pytest.raises(KeyboardInterrupt):
        with netem.ShapedNetwork([("a", None)]) as net:
            raise KeyboardInterrupt
    assert net.leftovers() == []


def test_delay_is_netem_where_the_kernel_has_it_and_refused_where_not() -> None:
    if not _ok.delay:  # this project's CI machine: tc works, sch_netem does not
        net = netem.ShapedNetwork([("a", 8e6)], delay_ms=5)
        with pytest.raises(netem.NetemError, match="sch_netem"):
            net.__enter__()
        assert net.leftovers() == []
        return
    with netem.ShapedNetwork([("a", 8e6), ("b", None)], delay_ms=5) as net:
        q = net.qdiscs()
        assert "netem" in q["a"] and "tbf" in q["a"] and "netem" in q["b"]


def test_torch_peer_runs_in_the_agents_namespaces(tmp_path) -> None:
    """bench e2e's torch peer under ``--shaping tc``: one rank per agent namespace, gloo bound
    to the namespace's uplink, the rendezvous on rank 0's address, user-space latency on
    top; it trains exactly as one process does."""
    from accept_mqtt.bench.torchpipe import max_abs_diff, run_one_process, run_torch_pipeline

    kw = {"batch_size": 16, "micro_batches": 4, "steps": 2, "seed": 1234, "lr": 0.05}
    with netem.ShapedNetwork([("r0", 50e6), ("r1", 50e6)]) as net:
        res = run_torch_pipeline(
            "cnn", 0.5, [0, 7, 14], check=True, latency_s=0.01, workdir=tmp_path,
            command_prefixes=[net.exec_prefix("r0"), net.exec_prefix("r1")],
            master_addr=net.endpoints["r0"].address,
            worker_env=[{"GLOO_SOCKET_IFNAME": "up0"}] * 2, **kw)
    one = run_one_process("cnn", 0.5, check=True, **kw)
    assert max_abs_diff(res["state_dict"], one["state_dict"]) < 1e-6
    assert net.leftovers() == []
