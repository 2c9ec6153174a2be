"""``bench accuracy``'s per-link options: delta-coded activations and error feedback."""

from __future__ import annotations

import doctest

import pytest
import torch

from accept_mqtt.bench import accuracy
from accept_mqtt.bench.accuracy import LinkSpec, WireLink, train_one
from accept_mqtt.wire import codec, delta


def test_link_specs_parse_and_refuse_what_a_link_cannot_carry() -> None:
    assert doctest.testmod(accuracy).failed == 0
    assert LinkSpec.parse("a4/g8") == LinkSpec(4, 8)
    for bad, why in (("a2d", "expected"), ("a9/g8", "activation bits"),
                     ("a8/g16ef", "error feedback needs")):
        with pytest.raises(ValueError, match=why):
            LinkSpec.parse(bad)


def test_a_delta_link_sends_8_bit_plain_frames_first_then_2_bit_changes() -> None:
    link = WireLink(0, 0, seed=0, spec=LinkSpec.parse("a2d/g4ef"))
    x = torch.randn(4, 3, 5, 5)
    link.ids = torch.tensor([3, 1, 4, 5])
    first = link.send(x, "act")
    sent = link.bytes["act"]
    assert sent > 4 * 75  # a first crossing: plain, 8 bits per element, not 2
    link.step += 1
    change = torch.randn(4, 3, 5, 5) * 0.05
    second = link.send(x + change, "act")
    assert link.bytes["act"] - sent < sent  # the change: 2 bits per element (+ ids, bases)
    assert link.history is not None and link.receiver is not None
    assert torch.equal(link.history.history([3, 1, 4, 5]), link.receiver.history([3, 1, 4, 5]))
    # a 2-bit change lands far closer than a 2-bit activation would
    two_bit = codec.decode(codec.encode(x + change, bits=2, job="j", step=0, mb=0, kind="act",
                                        axis=1))
    assert float((second - x - change).abs().max()) < float((two_bit - x - change).abs().max())
    assert float((first - x).abs().max()) < float((two_bit - x - change).abs().max())
    link.ids = None
    before = link.bytes["act"]
    ev = link.send(x, "act")
    assert link.bytes["act"] - before > 4 * 75  # evaluation: plain, 8 bits per element
    assert float((ev - x).abs().max()) < float((two_bit - x - change).abs().max())


def test_training_with_delta_links_keeps_a_history_per_sample_at_both_ends() -> None:
    torch.set_num_threads(1)
    r = train_one("cnn", 0, 2, seed=0, spec=LinkSpec.parse("a2d/g4ef"))
    assert r["label"] == "a2 delta / g4 EF" and r["test_acc"] is not None
    assert r["test_acc"] > 0.5  # it trains (fp32 reaches ~0.99 here, plain 2-bit ~0.94)
    # every training sample's activation at both cuts, float16, at both ends of each cut
    from accept_mqtt.bench.accuracy import balanced_cuts
    from accept_mqtt.model.descriptors import describe, output_shapes
    from accept_mqtt.model.zoo import build_model
    m = build_model("cnn", seed=0)
    a, b = balanced_cuts([d.flops for d in describe(m)])
    shapes = output_shapes(m)
    per_sample = sum(int(torch.Size(shapes[c - 1]).numel()) for c in (a, b))
    assert r["history_bytes"] == 2 * 2 * r["n_train"] * per_sample
    assert delta.PLAIN_BITS == 8
