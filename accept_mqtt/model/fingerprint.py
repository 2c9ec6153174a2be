"""Fingerprints of a model's units: what a plan carries so every device builds the same model.

Guarantees:

* ``unit_fingerprints(layers)`` gives one short hex digest per unit from its architecture
  (class name, ``repr``, and for a traced unit its generated code) and the name, shape and
  dtype of every parameter and buffer; never from weight values, so it does not depend on the
  seed, and the same code builds the same digests on every machine.
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


def _describe_unit(unit: nn.Module) -> str:
    parts = [type(unit).__name__, repr(unit)]
    if isinstance(unit, fx.GraphModule):
        parts.append(unit.code)
    parts += [f"{k}:{tuple(t.shape)}:{t.dtype}" for k, t in unit.state_dict().items()]
    return "\n".join(parts)


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
