"""Delta-coded activations and error-feedback gradients in the planner (issue 15): their memory
in the one model of a stage's memory (``model/footprint.py``), to the byte against real
``ActHistory`` / ``ErrorFeedback`` state, in the agent's refusal and the partitioner's tables;
their codec cost; the configured options honoured exactly. Pure: no broker."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.coordinator.planner import (
    DeviceInfo,
    PlanningError,
    build_plan,
    honoured_widths,
    make_partition,
)
from accept_mqtt.model import footprint
from accept_mqtt.model.descriptors import describe
from accept_mqtt.model.zoo import build_model
from accept_mqtt.planning.partition import (
    InfeasiblePlanError,
    PartitionProblem,
    evaluate,
    partition,
    problem_from_profiles,
    stage_footprint,
    stage_memory_bytes,
)
from accept_mqtt.planning.partition.memory import memory_table
from accept_mqtt.wire import codec
from accept_mqtt.wire.delta import ActHistory, ErrorFeedback
from device_agent.agent import memory_refusal

SEED, BATCH, M, T = 3, 8, 2, 40  # a tiny data set: 40 samples, 5 batches of 2 x 4


def _descs() -> list:
    return describe(build_model("cnn", seed=SEED))


def _delta_job() -> tuple[list, TrainConfig, list[DeviceInfo]]:
    """The tiny job with both options on 2-bit activations and 4-bit gradients, 2 devices."""
    cfg = TrainConfig(model="cnn", batch_size=BATCH, micro_batches=M, devices=2, seed=SEED,
                      act_bits=2, grad_bits=4, act_delta=True, grad_feedback=True)
    return _descs(), cfg, [DeviceInfo(d, {"bench_gflops": 1.0}) for d in ("a", "b")]


def _problem(descs: list, *, delta: bool = True, feedback: bool = True,
             mem: float | None = None, devices: int = 2, train_samples: int = T,
             **kw: object) -> PartitionProblem:
    ids = [f"d{i}" for i in range(devices)]
    n = len(descs)
    return problem_from_profiles(
        ids, [[1.0] * n] * devices, [[2.0] * n] * devices, descs, BATCH // M,
        {i: ({"memory_limit_mb": mem / 2**20} if mem else {}) for i in ids},
        act_bits=(8, 4, 2), grad_bits=(8, 4), min_act_bits=2, min_grad_bits=4,
        micro_batches=M, snapshot_copies=footprint.SNAPSHOT_COPIES, codec_buffers=True,
        act_delta=delta, grad_feedback=feedback, train_samples=train_samples, **kw)


def test_footprint_with_delta_is_the_sum_of_its_parts_and_the_tables_agree() -> None:
    descs = _descs()
    p = _problem(descs)
    plain = _problem(descs, delta=False, feedback=False)
    n = p.num_layers
    for after in (0, 1):
        table = memory_table(p, after)
        for a, b in itertools.combinations(range(n + 1), 2):
            fp = stage_footprint(p, a, b, after)
            assert fp.total == fp.params + fp.stash + fp.codec + fp.history + fp.feedback
            assert table[a, b] == fp.total == stage_memory_bytes(p, a, b, after)
            # by hand: float16 rows of one sample per training sample at each inner cut,
            # float32 residuals of each micro-batch's gradient at the sender
            hist = 2 * T * ((descs[a].in_elems if a > 0 else 0)
                            + (descs[b - 1].out_elems if b < n else 0))
            fb = 4 * M * descs[a].in_elems * (BATCH // M) if a > 0 else 0
            assert (fp.history, fp.feedback) == (hist, fb)
            base = stage_footprint(plain, a, b, after)
            assert fp.total == base.total + hist + fb
            if hist:
                assert f"delta history {hist}" in fp.text()


def _first_layers(descs: list, cut: int) -> torch.nn.Module:
    model = build_model("cnn", seed=SEED)
    return torch.nn.Sequential(*list(model.layers)[:cut])


def test_act_history_after_one_epoch_is_the_models_figure_at_both_ends() -> None:
    """Real frames of a real model over one epoch of a tiny data set: what both ends hold is
    the footprint's delta history of the stage on each side, to the byte; the gradient
    sender's residuals are its error-feedback figure."""
    descs = _descs()
    cut = 7  # after the first maxpool: 512 values per sample
    head = _first_layers(descs, cut)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(T, 1, 8, 8, generator=g)
    send, recv, ef = ActHistory(), ActHistory(), ErrorFeedback()
    order = torch.randperm(T, generator=g)
    for step in range(2):  # two epochs: the second is all delta frames, nothing grows
        for bstart in range(0, T, BATCH):
            ids = order[bstart:bstart + BATCH]
            for mb, part in enumerate(ids.split(BATCH // M)):
                with torch.no_grad():
                    y = head(data[part])
                kw = dict(bits=2, job="j", mb=mb, kind="act")
                frame = codec.from_bytes(codec.to_bytes(send.encode(y, part, step=step, **kw)))
                assert frame.extra.get("delta", False) == (step > 0)
                recv.decode(frame)
                ef.encode(torch.randn(y.shape, generator=g), slot=mb, bits=4, job="j",
                          step=step, mb=mb, kind="grad")
        assert len(send) == len(recv) == T
        p = _problem(descs)
        up = stage_footprint(p, 0, cut, 1)  # the sender's stage: its outgoing link
        down = stage_footprint(p, cut, p.num_layers, 0)  # the receiver's: its incoming one
        assert send.nbytes == recv.nbytes == up.history == down.history
        assert ef.nbytes == down.feedback and up.feedback == 0


def test_the_agent_refuses_a_plan_whose_history_does_not_fit_naming_the_part() -> None:
    descs, cfg, devs = _delta_job()
    res = make_partition(descs, devs, cfg, method="equal", train_samples=T)
    assert res.act_delta == [True, False] and res.grad_feedback == [False, True]
    # the partition's own stages (flags included) on a plan built without the options, so
    # the test does not depend on how build_plan (the runtime's) sets them
    bare_cfg = replace(cfg, act_delta=False, grad_feedback=False)
    plan = build_plan("j", bare_cfg, len(descs), devs, list(res.cuts), method="equal",
                      act_bits=list(res.act_bits), grad_bits=list(res.grad_bits),
                      optimizer=cfg.optimizer_cfg(10))
    plan = replace(plan, stages=res.stages(), train_samples=T)
    for stage, need in zip(plan.stages, res.memory_bytes, strict=True):
        assert memory_refusal(plan, stage.device, need / 2**20) is None  # the planner's bytes
        why = memory_refusal(plan, stage.device, (need - 1) / 2**20)
        assert why is not None and f"stage {stage.index}" in why and "delta history" in why
    # the same plan without the options needs less: the history is what did not fit
    bare = replace(plan, stages=tuple(replace(s, act_delta=False, grad_feedback=False)
                                      for s in plan.stages))
    assert memory_refusal(bare, "a", (res.memory_bytes[0] - 1) / 2**20) is None


def test_a_split_whose_history_does_not_fit_is_refused_by_name_and_auto_places_it() -> None:
    descs = _descs()
    kw = dict(model="cnn", batch_size=BATCH, micro_batches=M, devices=2, seed=SEED)
    on = TrainConfig(**kw, act_bits=2, grad_bits=4, act_delta=True, grad_feedback=True)
    off = TrainConfig(**kw, act_bits=2, grad_bits=4)
    free = [DeviceInfo(d, {"bench_gflops": 1.0}) for d in ("a", "b")]
    eq_on = make_partition(descs, free, on, method="equal", train_samples=T)
    eq_off = make_partition(descs, free, off, method="equal", train_samples=T)
    limit = (max(eq_off.memory_bytes) + max(eq_on.memory_bytes)) / 2  # fits only without
    assert max(eq_off.memory_bytes) < limit < max(eq_on.memory_bytes)
    devs = [DeviceInfo(d, {"bench_gflops": 1.0, "memory_limit_mb": limit / 2**20})
            for d in ("a", "b")]
    with pytest.raises(PlanningError, match=r"the equal split does not fit: stage \d .*"
                                            r"delta history \d+"):
        make_partition(descs, devs, on, method="equal", train_samples=T)
    res = make_partition(descs, devs, on, method="dp", train_samples=T)
    assert res.feasible and max(res.memory_bytes) <= limit
    assert res.cuts != eq_on.cuts and res.act_delta[0] and res.grad_feedback[1]
    # a history no cut makes small enough: the DP says what the options add
    with pytest.raises(InfeasiblePlanError, match="delta history: 100000 samples"):
        make_partition(descs, devs, on, method="dp", train_samples=100_000)


def test_the_options_restrict_widths_need_train_samples_and_cost_codec_time() -> None:
    descs = _descs()
    p = _problem(descs)
    with pytest.raises(ValueError, match="train_samples"):
        _problem(descs, train_samples=0)
    raw = PartitionProblem(devices=p.devices, compute_ms=p.compute_ms, out_elems=p.out_elems,
                           act_bits=(32, 8), grad_bits=(32,), act_delta=True, train_samples=5)
    assert raw.allowed_act_bits == (8,)  # a raw link carries no delta
    with pytest.raises(ValueError, match="k-bit"):
        replace(raw, grad_feedback=True)
    plain = _problem(descs, delta=False, feedback=False)
    cuts, devs = [0, 7, p.num_layers], ["d0", "d1"]
    a, b = evaluate(p, devs, cuts, [2, 32], [32, 4]), evaluate(plain, devs, cuts, [2, 32],
                                                                  [32, 4])
    assert a.compute_ms[0] > b.compute_ms[0] and a.compute_ms[1] > b.compute_ms[1]
    assert a.uplink_ms == b.uplink_ms  # same bytes on the wire
    # the DP's value of its answer is evaluate's, with the options' costs in both
    best = partition(p)
    again = evaluate(p, best.devices, best.cuts, best.act_bits, best.grad_bits)
    assert best.bottleneck_ms == again.bottleneck_ms and best.stage_ms == again.stage_ms
    assert all(s.act_delta for s in best.stages()[:-1])
    assert all(s.grad_feedback for s in best.stages()[1:])
    assert np.isfinite(best.bottleneck_ms)


def test_configured_options_are_honoured_never_replaced() -> None:
    descs, cfg, devs = _delta_job()
    res = make_partition(descs, devs, cfg, method="dp", train_samples=T)
    assert honoured_widths(res, cfg, "dp") is res
    with pytest.raises(PlanningError, match="act_delta"):
        honoured_widths(replace(res, act_delta=[False, False]), cfg, "dp")
    with pytest.raises(PlanningError, match="grad_feedback"):
        honoured_widths(res, replace(cfg, grad_feedback=False), "dp")
