"""Delta-coded activations and error-feedback gradients (accept_mqtt/wire/delta.py), alone."""

from __future__ import annotations

import doctest

import pytest
import torch

from accept_mqtt.wire import codec, delta
from accept_mqtt.wire.delta import ActHistory, ErrorFeedback


def _wire(frame: codec.TensorFrame) -> codec.TensorFrame:
    return codec.from_bytes(codec.to_bytes(frame), "t")


def _send(send: ActHistory, x: torch.Tensor, ids: list[int], step: int,
          bits: int = 2) -> codec.TensorFrame:
    return _wire(send.encode(x, ids, step=step, bits=bits, job="j", mb=0, kind="act",
                             axis=codec.channel_axis(x.shape, bits)))


def test_doctests() -> None:
    assert doctest.testmod(delta).failed == 0


def test_both_ends_stay_bit_identical_and_the_error_shrinks_as_the_change_does() -> None:
    g = torch.Generator().manual_seed(0)
    send, recv = ActHistory(), ActHistory()
    target = torch.randn(8, 4, 5, 5, generator=g)
    ids = list(range(100, 108))
    errors, plain = [], []
    for step in range(8):
        x = target + torch.randn(8, 4, 5, 5, generator=g) * 0.5 ** step  # converging
        f = _send(send, x, ids, step)
        plain.append(0 if f.extra.get(delta.DELTA_KEY) else f.bits)
        got = recv.decode(f, "t")
        assert torch.equal(send.history(ids), recv.history(ids))
        errors.append(float((got - x).abs().max()))
    # the first frame is a plain one at PLAIN_BITS, then 2-bit changes only
    assert plain == [delta.PLAIN_BITS] + [0] * 7
    # the changes shrink 128x from the first delta frame to the last, and so does the error
    assert errors[-1] < errors[1] / 20


def test_a_frame_with_a_sample_without_history_is_plain_and_restarts_its_history() -> None:
    send, recv = ActHistory(), ActHistory()
    x = torch.randn(3, 6)
    recv.decode(_send(send, x, [1, 2, 3], 0))
    f = _send(send, x, [1, 2, 4], 1)  # 4 is new: the whole frame goes plain
    assert not f.extra.get(delta.DELTA_KEY, False)
    recv.decode(f)
    f = _send(send, x[:2], [4, 3], 2)
    assert f.extra[delta.DELTA_KEY] is True
    recv.decode(f)
    assert torch.equal(send.history([1, 2, 3, 4]), recv.history([1, 2, 3, 4]))


def test_a_history_mismatch_is_refused_and_forgotten_never_decoded_wrong() -> None:
    send, recv = ActHistory(), ActHistory()
    x = torch.randn(2, 6)
    recv.decode(_send(send, x, [5, 6], 0))
    lost = _send(send, x * 1.1, [5, 6], 1)  # never reaches the receiver
    assert lost.extra[delta.DELTA_KEY]
    f = _send(send, x * 1.2, [5, 6], 2)
    with pytest.raises(codec.FrameError, match="sample 5 against its history of step 1, but "
                                               "this end holds step 0"):
        recv.decode(f)
    assert len(recv) == 0  # forgotten; a reset sender's next frame restarts them
    send.reset()
    f = _send(send, x, [5, 6], 3)
    assert not f.extra.get(delta.DELTA_KEY, False)
    recv.decode(f)
    assert torch.equal(send.history([5, 6]), recv.history([5, 6]))


def test_a_receiver_without_history_refuses_a_delta_frame() -> None:
    send = ActHistory()
    x = torch.randn(2, 3)
    _send(send, x, [0, 1], 0)
    with pytest.raises(codec.FrameError, match="holds none"):
        ActHistory().decode(_send(send, x, [0, 1], 1))


def test_ids_must_fit_the_frame() -> None:
    f = codec.encode(torch.zeros(3, 2), bits=8, job="j", step=0, mb=0, kind="act",
                     extra={"ids": delta.pack_ids([1, 2])})
    with pytest.raises(codec.FrameError, match="'ids' must be 3 uint32"):
        ActHistory().decode(_wire(f))
    with pytest.raises(ValueError, match="sample ids"):
        delta.pack_ids([-1])
    with pytest.raises(ValueError, match="2 sample ids for a batch of 3"):
        ActHistory().encode(torch.zeros(3, 2), [1, 2], step=0, bits=8, job="j", mb=0,
                            kind="act")


def test_history_is_kept_in_float16_within_its_range() -> None:
    send = ActHistory()
    x = torch.tensor([[1e6, -1e6, 0.5]])
    _send(send, x, [0], 0, bits=8)
    h = send.history([0])
    assert h.dtype == torch.float16 and torch.isfinite(h).all()
    assert send.nbytes == 3 * 2


def test_error_feedback_sends_what_was_lost_later_and_forgets_on_reset() -> None:
    g = torch.Generator().manual_seed(1)
    ef = ErrorFeedback()
    grads = [torch.randn(4, 8, generator=g) for _ in range(30)]
    sent = [codec.decode(_wire(ef.encode(x, slot=0, bits=2, job="j", step=i, mb=0,
                                         kind="grad", stochastic=False)))
            for i, x in enumerate(grads)]
    residual = ef.residual(0)
    assert residual is not None
    # telescoping: everything sent plus what is still owed is exactly what was given
    assert torch.allclose(sum(sent) + residual, sum(grads), atol=1e-4)
    # without feedback the 2-bit rounding error of the sum grows with the steps
    plain = sum(codec.decode(codec.encode(x, bits=2, job="j", step=0, mb=0, kind="grad"))
                for x in grads)
    assert float((sum(sent) - sum(grads)).abs().max()) < float(
        (plain - sum(grads)).abs().max())
    ef.encode(torch.zeros(2, 8), slot=0, bits=2, job="j", step=0, mb=0, kind="grad")
    assert ef.residual(0) is not None and ef.residual(0).shape == (2, 8)  # a new shape
    ef.reset()
    assert ef.residual(0) is None and ef.nbytes == 0
