"""The objective: predicted steady-state ms per micro-batch of an assignment.

A device runs two resources concurrently, as ``device_agent`` does (compute in a worker thread,
sends queued on one paced uplink, ``device_agent/link.py``):

* compute: fwd+bwd of its layers, plus codec work — encoding the activations it sends and the
  gradients it sends, decoding the activations and gradients it receives — plus
  ``frame_cpu_ms`` per frame it sends or receives, whatever the size;
* uplink: the bytes of its outgoing activation frame (to the next stage) and its outgoing
  gradient frame (to the previous stage), at *its own* uplink bandwidth. Receivers' downlinks
  are not modelled (the broker fans in; the emulated link paces the sender only).

The link options add codec work (``wire/delta.py``; figures per element of the frame, each
"pass" an elementwise float32 operation costed as the codec model's raw16 conversion, one
memory-bound pass over the tensor, ``delta_pass_ms``):

* a delta-coded activation link (``act_delta``): at the sender, its own frame decoded again
  (``decode(bits)``: the history must hold what the receiver decodes) and four passes
  (history gather, subtract, add, scatter to float16); at the receiver three (gather, add,
  scatter); plus ``DELTA_SAMPLE_MS`` per sample at each end (the history is a row per sample);
* an error-feedback gradient link (``grad_feedback``): at the sender, its own frame decoded
  again and two passes (add the residual, subtract the decoded frame).

A delta-coded link is planned for its plain frames (``planned_act_bits``): a sample's first
crossing goes at ``delta.PLAIN_BITS`` (8) bits at least, so the first epoch sends that much,
and the cuts must hold for it; the later epochs' k-bit changes are a gain the plan does not
count on. (Planned for k bits instead, the DP cut where tensors are bigger and the first
epoch's frames then took 4x the planned time: 0.65x of the 8-bit plan, docs/benchmarks.md.)

In steady state each resource is a pipeline server, so a stage's time per micro-batch is
``max(compute, uplink)`` and the pipeline's is the max over stages (PipeDream's bottleneck).
Frame size: ``ceil(n * bits / 8) + frame_overhead_bytes`` for ``n`` elements. Stage 0 sends no
gradients and the last stage no activations; the coordinator's input is not counted.

Guarantee: ``stage_cost_array`` and ``evaluate`` compute every number with the same formulas
(prefix-sum differences of compute), so the DP's value of an assignment is the one
``evaluate`` reports.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from accept_mqtt.wire.delta import PLAIN_BITS

from .memory import fits, memory_table, stage_memory_bytes
from .problem import PartitionProblem, PartitionResult, _check_bits

Choice = tuple[int, int]  # (act bits, grad bits) at one cut

# Per sample and link end, the Python work of ActHistory (a dict lookup, a row's clone on
# store, its place in the stack on gather): an estimate of torch's per-call overhead for a
# small tensor on a laptop-class core (a few microseconds), not measured in the pipeline.
DELTA_SAMPLE_MS = 0.004
SEND_PASSES, RECV_PASSES, FEEDBACK_PASSES = 4.0, 3.0, 2.0  # see the module docstring


def delta_pass_ms(p: PartitionProblem) -> float:
    """ms per element of one elementwise float32 pass: the codec model's raw16 cost (a
    float32 <-> float16 conversion; ``DEFAULT_CODEC``'s 1 ns, ``bench codec`` measures raw16
    at 0.2-0.4 ns per element on one EPYC core, docs/codec.md)."""
    return p.codec.encode(16) if 16 in p.codec.encode_ms_per_elem else 0.0


def option_in_ms(p: PartitionProblem, grad_bits: np.ndarray | float) -> np.ndarray | float:
    """Extra codec ms per element at a stage's *incoming* cut for the options: receiving a
    delta-coded activation, sending an error-feedback gradient of ``grad_bits``."""
    pas = delta_pass_ms(p)
    x = RECV_PASSES * pas if p.act_delta else 0.0
    if p.grad_feedback:
        dec = np.vectorize(p.codec.decode, otypes=[float])(grad_bits)
        x = x + (dec + FEEDBACK_PASSES * pas)
    return x


def option_out_ms(p: PartitionProblem, act_bits: np.ndarray | float) -> np.ndarray | float:
    """Extra codec ms per element at a stage's *outgoing* cut: sending a delta-coded
    activation of ``act_bits``."""
    if not p.act_delta:
        return 0.0
    dec = np.vectorize(p.codec.decode, otypes=[float])(act_bits)
    return dec + SEND_PASSES * delta_pass_ms(p)


def option_sample_ms(p: PartitionProblem) -> float:
    """Per-frame ms of a delta link end: ``DELTA_SAMPLE_MS`` per sample of the micro-batch."""
    return DELTA_SAMPLE_MS * float(p.micro_batch_size) if p.act_delta else 0.0


def choices(p: PartitionProblem) -> list[Choice]:
    """Every allowed (act, grad) pair for a cut, most bits first (ties go to more bits)."""
    return list(itertools.product(p.allowed_act_bits, p.allowed_grad_bits))


def cut_elems(p: PartitionProblem) -> np.ndarray:
    """Elements crossing cut ``c`` (after layer ``c - 1``), c = 0..L; 0 at both ends."""
    n = np.zeros(p.num_layers + 1)
    n[1:-1] = p.out_elems[:-1]
    return n


def planned_act_bits(p: PartitionProblem, bits: int) -> int:
    """The width an activation link is planned for: a delta link's plain frames' width."""
    return max(bits, PLAIN_BITS) if p.act_delta else bits


def wire_bytes(p: PartitionProblem, n: np.ndarray | float, bits: int) -> np.ndarray:
    n = np.asarray(n, dtype=np.float64)
    return np.where(n > 0, np.ceil(n * bits / 8.0) + p.frame_overhead_bytes, 0.0)


def send_ms(p: PartitionProblem, device: int, nbytes: np.ndarray) -> np.ndarray:
    bw = p.devices[device].bandwidth_bps
    if not bw:
        return np.zeros_like(nbytes)
    return nbytes * (8.0e3 / bw)


def _frame_ms(p: PartitionProblem, device: int, n: float, bits: int) -> float:
    """Scalar ``send_ms(wire_bytes(n, bits))``."""
    bw = p.devices[device].bandwidth_bps
    if n <= 0 or not bw:
        return 0.0
    return float(math.ceil(n * bits / 8.0) + p.frame_overhead_bytes) * (8.0e3 / bw)


@dataclass(frozen=True)
class DeviceTables:
    """Per-device terms of the objective, indexed by cut and choice (L+1, C)."""

    prefix: np.ndarray  # (L+1,) cumulative compute ms
    codec_in: np.ndarray  # decode incoming act + encode outgoing grad at the stage's first cut
    codec_out: np.ndarray  # encode outgoing act + decode incoming grad at its last cut
    up_in: np.ndarray  # send ms of the gradient frame at the first cut
    up_out: np.ndarray  # send ms of the activation frame at the last cut


def device_tables(p: PartitionProblem, d: int, cand: Sequence[Choice]) -> DeviceTables:
    n = cut_elems(p)
    scale = p.devices[d].codec_scale
    act = [c[0] for c in cand]
    grad = [c[1] for c in cand]
    dec_a = np.array([p.codec.decode(b) for b in act])
    enc_a = np.array([p.codec.encode(b) for b in act])
    dec_g = np.array([p.codec.decode(b) for b in grad])
    enc_g = np.array([p.codec.encode(b) for b in grad])
    # one frame in, one out at every inner cut; a delta link's ends each touch every sample
    frames = (2.0 * p.frame_cpu_ms + scale * option_sample_ms(p)) * (n > 0)
    codec_in = scale * n[:, None] * (dec_a + enc_g + option_in_ms(p, np.array(grad)))[None, :] \
        + frames[:, None]
    codec_out = scale * n[:, None] * (enc_a + dec_g + option_out_ms(p, np.array(act)))[None, :] \
        + frames[:, None]
    up_in = np.stack([send_ms(p, d, wire_bytes(p, n, b)) for b in grad], axis=1)
    up_out = np.stack([send_ms(p, d, wire_bytes(p, n, planned_act_bits(p, b))) for b in act],
                      axis=1)
    prefix = np.concatenate([[0.0], np.cumsum(p.compute_ms[d])])
    return DeviceTables(prefix, codec_in, codec_out, up_in, up_out)


def stage_cost_array(t: DeviceTables) -> np.ndarray:
    """``cost[a, ka, b, kb]``: stage time on this device for layers ``[a, b)`` with choice
    ``ka`` at cut ``a`` and ``kb`` at cut ``b``; ``inf`` unless ``a < b``. Memory not applied."""
    comp = (t.prefix[None, :] - t.prefix[:, None])[:, None, :, None]
    comp = comp + t.codec_in[:, :, None, None] + t.codec_out[None, None, :, :]
    up = t.up_in[:, :, None, None] + t.up_out[None, None, :, :]
    cost = np.maximum(comp, up)
    n1 = t.prefix.shape[0]
    bad = np.arange(n1)[None, :] <= np.arange(n1)[:, None]  # b <= a
    cost[np.broadcast_to(bad[:, None, :, None], cost.shape)] = np.inf
    return cost


def memory_mask(p: PartitionProblem, d: int, stages_after: int) -> np.ndarray | None:
    """(L+1, L+1) True where ``[a, b)`` fits device ``d``; None when everything fits."""
    limit = p.devices[d].memory_bytes
    if limit is None:
        return None
    ok = memory_table(p, stages_after) <= limit
    return None if ok.all() else ok


def _check_assignment(p: PartitionProblem, devices: Sequence[str], cuts: Sequence[int],
                      act_bits: Sequence[int], grad_bits: Sequence[int]) -> list[int]:
    k = len(devices)
    if k < 1:
        raise ValueError("an assignment needs at least one stage")
    if len(set(devices)) != k:
        raise ValueError(f"a device can hold only one stage, got {list(devices)}")
    idx = [p.index_of(d) for d in devices]
    if len(cuts) != k + 1 or cuts[0] != 0 or cuts[-1] != p.num_layers:
        raise ValueError(f"{k} stages need cuts [0, ..., {p.num_layers}] of length {k + 1}, "
                         f"got {list(cuts)}")
    if any(b <= a for a, b in itertools.pairwise(cuts)):
        raise ValueError(f"cuts must increase strictly (>= 1 layer per stage), got {list(cuts)}")
    if len(act_bits) != k or len(grad_bits) != k:
        raise ValueError(f"{k} stages need {k} act_bits and {k} grad_bits")
    for b in (*act_bits, *grad_bits):
        _check_bits(b, "bits")
    return idx


def evaluate(p: PartitionProblem, devices: Sequence[str], cuts: Sequence[int],
             act_bits: Sequence[int], grad_bits: Sequence[int], method: str = "evaluate",
             plan_seconds: float = 0.0) -> PartitionResult:
    """The predicted cost of any assignment (``act_bits[i]``: stage i -> i+1, ``grad_bits[i]``:
    stage i -> i-1; the unused ``act_bits[-1]`` and ``grad_bits[0]`` are ignored).

    ``feasible`` says whether every stage fits its device's memory; the times are reported
    either way so that baselines that do not check memory can still be scored.
    """
    idx = _check_assignment(p, devices, cuts, act_bits, grad_bits)
    k = len(idx)
    n = cut_elems(p)
    comp_l, up_l, stage_l, mem_l = [], [], [], []
    feasible = True
    for s, d in enumerate(idx):
        a, b = cuts[s], cuts[s + 1]
        # bits at cut a (in) and cut b (out); unused ends fall back to 32 (n = 0 there anyway)
        a_in, g_out = (act_bits[s - 1], grad_bits[s]) if s > 0 else (32, 32)
        a_out, g_in = (act_bits[s], grad_bits[s + 1]) if s < k - 1 else (32, 32)
        scale = p.devices[d].codec_scale
        prefix = np.concatenate([[0.0], np.cumsum(p.compute_ms[d])])
        # same arithmetic, in the same order, as device_tables + stage_cost_array
        per_frame = 2.0 * p.frame_cpu_ms + scale * option_sample_ms(p)
        c_in = (scale * float(n[a]) * float(p.codec.decode(a_in) + p.codec.encode(g_out)
                                            + option_in_ms(p, g_out))
                + per_frame * float(n[a] > 0))
        c_out = (scale * float(n[b]) * float(p.codec.encode(a_out) + p.codec.decode(g_in)
                                             + option_out_ms(p, a_out))
                 + per_frame * float(n[b] > 0))
        comp = float(prefix[b] - prefix[a]) + c_in + c_out
        up = (_frame_ms(p, d, float(n[a]), g_out)
              + _frame_ms(p, d, float(n[b]), planned_act_bits(p, a_out)))
        mem = stage_memory_bytes(p, a, b, k - 1 - s)
        feasible = feasible and fits(p, d, mem)
        comp_l.append(comp)
        up_l.append(up)
        stage_l.append(max(comp, up))
        mem_l.append(mem)
    ab = [int(x) for x in act_bits[:-1]] + [32]
    gb = [32] + [int(x) for x in grad_bits[1:]]
    ad = [p.act_delta] * (k - 1) + [False]  # a job-wide option: on every link there is
    gf = [False] + [p.grad_feedback] * (k - 1)
    return PartitionResult(
        devices=list(devices), cuts=[int(c) for c in cuts], act_bits=ab, grad_bits=gb,
        stage_ms=stage_l, bottleneck_ms=max(stage_l), method=method, compute_ms=comp_l,
        uplink_ms=up_l, memory_bytes=mem_l, feasible=feasible, plan_seconds=plan_seconds,
        act_delta=ad, grad_feedback=gf,
    )


def ideal_bound_ms(p: PartitionProblem) -> float:
    """Total work over total speed, no communication: ``1 / sum_d (1 / T_d)`` with ``T_d`` the
    whole model's compute on device ``d`` (i.e. reference work / sum of relative speeds).

    A true lower bound when devices differ by a constant speed factor per layer; with
    layer-dependent speed ratios a split can beat it slightly.
    """
    totals = p.compute_ms.sum(axis=1)
    if np.any(totals <= 0):
        return 0.0
    return float(1.0 / np.sum(1.0 / totals))
