"""Fingerprints of a model's units: what a plan carries so every device builds the same model.

Guarantees:

* ``unit_fingerprints(layers)`` gives one short hex digest per unit from its architecture
  (each submodule's class and constructor arguments, a traced unit's operations in order) and
  the name, shape and dtype of every parameter and buffer; never from weight values, so it
  does not depend on the seed, and the same model code gives the same digests on every
  machine.
* ``check(expected, layers)`` returns quietly when they agree and otherwise raises
  ``FingerprintMismatch`` naming the first unit that differs (or the differing unit count).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from torch import fx, nn

DIGEST_HEX = 16  # 64 bits per unit: collisions between two builds are not a practical concern


class FingerprintMismatch(ValueError):
    pass


def _target_name(target: object) -> str:
    return str(getattr(target, "__name__", target))


def _describe_unit(unit: nn.Module) -> str:
    """The unit's architecture as canonical text: every submodule's class and constructor
    arguments (``extra_repr``), a traced unit's operations with their arguments (nodes by
    position, not by their generated names), and every parameter's and buffer's name, shape
    and dtype. No ``repr`` or generated code, whose layout may change between torch versions
    while the model does not."""
    lines = [f"{name}:{type(m).__name__}({m.extra_repr()})" for name, m in unit.named_modules()]
    if isinstance(unit, fx.GraphModule):
        position: dict[fx.Node, int] = {}
        for i, n in enumerate(unit.graph.nodes):
            position[n] = i
            args = fx.node.map_arg((n.args, n.kwargs), lambda a: f"%{position[a]}")
            lines.append(f"{n.op} {_target_name(n.target)} {args!r}")
    lines += [f"{k}:{tuple(t.shape)}:{t.dtype}" for k, t in unit.state_dict().items()]
    return "\n".join(lines)


def unit_fingerprints(layers: Sequence[nn.Module]) -> tuple[str, ...]:
    """One digest per unit (module docstring)."""
    return tuple(hashlib.sha256(_describe_unit(u).encode()).hexdigest()[:DIGEST_HEX]
                 for u in layers)


def check(expected: Sequence[str], layers: Sequence[nn.Module], model: str) -> None:
    """Raise ``FingerprintMismatch`` if ``layers`` are not the units ``expected`` describes."""
    here = unit_fingerprints(layers)
    for i, (want, got) in enumerate(zip(expected, here, strict=False)):
        if want != got:
            summary = " ".join(repr(layers[i]).split())[:120]
            raise FingerprintMismatch(
                f"model {model} built here differs from the plan's at unit {i}: here it is "
                f"{type(layers[i]).__name__} {summary} (fingerprint {got}, the plan's {want}); "
                "install the same version of the model on every device")
    if len(expected) != len(here):
        raise FingerprintMismatch(
            f"model {model} built here has {len(here)} units, the plan's {len(expected)}: "
            f"the first differing unit is {min(len(here), len(expected))}")
