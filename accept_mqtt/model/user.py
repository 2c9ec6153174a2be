"""The user's own model: ``MODULE:FACTORY`` loaded, cut into units and checked.

``MODULE`` is a module name (imported as Python imports it, after the ``model_path``
directories) or a path to a ``.py`` file (tried as given, then by its file name in each
``model_path`` directory). ``FACTORY()`` takes no arguments and returns an ``nn.Sequential``,
a list of layers, or any module torch.fx can trace (cut by ``fxcut``).

Guarantees of ``build_user_model(spec, seed=s, input_shape=..., num_classes=...)``:

* ``MODULE`` is imported and ``FACTORY()`` runs with torch's global RNG seeded by ``s`` under
  the zoo's build lock (``zoo.seeded``), so every device and the one-process reference get the
  same initial weights, as with ``zoo.build_model``.
* The units: an ``nn.Sequential``'s children, the list's items, or the traced module cut
  wherever exactly one tensor crosses (a skip connection stays in one unit).
* Before it returns, a zero sample has run through the units in order (eval mode, no
  gradient, every training flag and BatchNorm statistic as it was): each unit took what the
  one before gave and returned one tensor, the last ``num_classes`` values per sample; no
  parameter or buffer belongs to two units.
* Every failure is a ``UserModelError`` of its own kind (``ModelSpecError``,
  ``FactoryError``, ``UntraceableModelError``, ``UnitsDontChainError``) saying what and where;
  nothing is replaced by a default.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from . import fxcut
from .zoo import ZooModel, seeded


class UserModelError(ValueError):
    pass


class ModelSpecError(UserModelError):
    """``MODULE:FACTORY`` is malformed, or the module or the factory cannot be found."""


class FactoryError(UserModelError):
    """``FACTORY()`` raised, or returned something that is not a model."""


class UntraceableModelError(UserModelError):
    """torch.fx cannot trace the module, or its forward is not one tensor to one tensor."""


class UnitsDontChainError(UserModelError):
    """A unit does not take what the one before gives, or the output is not the classes."""


def is_user_model(name: str) -> bool:
    """``MODULE:FACTORY`` rather than a zoo name."""
    return ":" in name


def _load_module(module: str, model_path: Sequence[str]) -> ModuleType:
    if module.endswith(".py") or "/" in module:
        given = Path(module)
        candidates = [given, *(Path(d) / given.name for d in model_path)]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise ModelSpecError(f"no file {module} (looked in: "
                                 f"{', '.join(str(p) for p in candidates)})")
        name = f"accept_user_model_{path.stem}"
        loaded = sys.modules.get(name)
        if loaded is not None and getattr(loaded, "__file__", None) == str(path.resolve()):
            return loaded
        spec = importlib.util.spec_from_file_location(name, path.resolve())
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # classes defined in the file find their module by name
        try:
            spec.loader.exec_module(mod)
        except Exception as e:
            del sys.modules[name]
            raise ModelSpecError(f"importing {path} failed: {type(e).__name__}: {e}") from None
        return mod
    for d in reversed(model_path):  # model_path first, in the order given
        if d not in sys.path:
            sys.path.insert(0, d)
    try:
        return importlib.import_module(module)
    except Exception as e:  # ModuleNotFoundError, or the module's own failure
        raise ModelSpecError(f"cannot import {module!r}: {type(e).__name__}: {e} (install it "
                             "on this machine or put its directory on PYTHONPATH; a device "
                             "agent can also be pointed at it with --model-path)") from None


def load_factory(spec: str, model_path: Sequence[str] = ()) -> Callable[[], Any]:
    """The ``FACTORY`` callable of ``MODULE:FACTORY``."""
    module, sep, factory = spec.rpartition(":")
    if not sep or not module or not factory.isidentifier():
        raise ModelSpecError(f"model {spec!r} must be MODULE:FACTORY, e.g. mynets:make_net or "
                             "path/to/nets.py:make_net")
    mod = _load_module(module, model_path)
    fn = getattr(mod, factory, None)
    if not callable(fn):
        raise ModelSpecError(f"{module} has no callable {factory!r}")
    return fn


def units_of(made: Any, spec: str, sample: torch.Tensor) -> list[nn.Module]:
    """The units of what the factory returned (see the module docstring)."""
    if type(made) is nn.Sequential:
        return list(made.children())
    if isinstance(made, list | tuple):
        for i, item in enumerate(made):
            if not isinstance(item, nn.Module):
                raise FactoryError(f"{spec} returned a list whose item {i} is a "
                                   f"{type(item).__name__}, not an nn.Module")
        return list(made)
    if not isinstance(made, nn.Module):
        raise FactoryError(f"{spec} returned a {type(made).__name__}; it must return an "
                           "nn.Module, an nn.Sequential or a list of layers")
    try:
        return fxcut.cut(made, sample)
    except fxcut.CutError as e:
        raise UntraceableModelError(f"{spec}: {e} (make forward free of control flow that "
                                    "depends on the input, or return a list of layers)") from None


@torch.no_grad()
def check_chain(units: Sequence[nn.Module], spec: str, input_shape: tuple[int, ...],
                num_classes: int) -> None:
    """Run a zero sample through ``units`` in order (module docstring); raise
    ``UnitsDontChainError`` naming the first unit that does not fit."""
    if not units:
        raise UnitsDontChainError(f"{spec} has no layers")
    owner: dict[int, int] = {}
    for i, u in enumerate(units):
        for t in [*u.parameters(), *u.buffers()]:
            j = owner.setdefault(id(t), i)
            if j != i:
                raise UnitsDontChainError(f"{spec}: units {j} and {i} ({type(u).__name__}) "
                                          "share a parameter or buffer; a stage cannot hold "
                                          "another stage's weights")
    x = torch.zeros(1, *input_shape)
    with fxcut.eval_mode(*units):
        for i, u in enumerate(units):
            came = f"the input [1, {', '.join(map(str, input_shape))}]" if i == 0 else (
                f"unit {i - 1}'s output {list(x.shape)}")
            try:
                y = u(x)
            except Exception as e:
                raise UnitsDontChainError(f"{spec}: unit {i} ({type(u).__name__}) does not "
                                          f"take {came}: {type(e).__name__}: {e}") from None
            if not isinstance(y, torch.Tensor):
                raise UnitsDontChainError(f"{spec}: unit {i} ({type(u).__name__}) returns a "
                                          f"{type(y).__name__}, not one tensor")
            x = y
    if tuple(x.shape) != (1, num_classes):
        raise UnitsDontChainError(f"{spec}: the model's output per sample is "
                                  f"{list(x.shape[1:])}, but the data set has {num_classes} "
                                  "classes: the last layer must give one score per class")


def build_user_model(spec: str, *, seed: int, input_shape: Sequence[int] | None,
                     num_classes: int | None, model_path: Sequence[str] = ()) -> ZooModel:
    """The user's model ``spec`` with weights fixed by ``seed`` (module docstring)."""
    if input_shape is None or num_classes is None:
        raise ModelSpecError(f"{spec}: a model of your own needs the input shape and class "
                             "count (they come from the data set)")
    shape = tuple(int(d) for d in input_shape)
    with seeded(seed):  # importing may draw from the RNG too (module-level layers)
        factory = load_factory(spec, model_path)
        try:
            made = factory()
        except Exception as e:
            raise FactoryError(f"{spec}() raised {type(e).__name__}: {e}") from None
        units = units_of(made, spec, torch.zeros(1, *shape))
        check_chain(units, spec, shape, num_classes)  # a forward may draw random numbers
    return ZooModel(spec, units, shape, num_classes)
