"""Cutting any ``nn.Module`` that torch.fx can trace into pipeline units.

A pipeline stage passes exactly one tensor to the next, so a module is cut only where exactly
one tensor crosses. ``cut_points`` finds those points in the traced graph and ``cut`` builds
the units.

Guarantees of ``cut(module, sample)``:

* Running the units in order computes what ``module`` computes: the same operations in the
  same order on the module's own parameters (the units hold the module's submodules, not
  copies).
* A cut falls after an operation only if (a) exactly one value made before the cut is used
  after it, (b) that value is a tensor (not a size, a tuple or a ``None``), (c) no submodule or
  attribute holding parameters or buffers is used on both sides (a tied weight cannot live on
  two devices), and (d) nothing after the cut writes into that tensor in place (a stage's
  input is a leaf autograd may not modify). So a skip connection, whose input is still needed
  after the branch, stays inside one unit.
* A unit that is one submodule applied to the crossing tensor is that submodule itself, so its
  descriptor is the zoo's for that layer type; any other unit is a ``torch.fx.GraphModule``
  named after the deepest module that contains all its parts (e.g. ``BasicBlock``), whose
  parameter names are the module's own (``layer1.0.conv1.weight``).
* A module fx cannot trace, whose ``forward`` does not take one tensor and return one, or
  that traces differently in eval mode than in training (a ``self.training`` branch the trace
  would freeze) is a ``CutError`` saying which; the module's training flags are as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata


class CutError(ValueError):
    pass


@contextlib.contextmanager
def eval_mode(*modules: nn.Module, training: bool = False) -> Iterator[None]:
    """Eval mode (BatchNorm keeps its running stats) for a probe, or training mode with
    ``training``; every module's flag restored afterwards."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.train(training)
    try:
        yield
    finally:
        for m, t in flags:
            m.train(t)


def trace(module: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` in training mode, its failure a ``CutError`` with fx's
    reason. A forward that reads ``self.training`` outside torch's own layers would have one
    branch baked into the trace, so a module traced differently in eval mode is refused."""
    try:
        with eval_mode(module):
            evaluating = fx.symbolic_trace(module).code
        with eval_mode(module, training=True):
            gm = fx.symbolic_trace(module)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError...
        raise CutError(f"torch.fx cannot trace {type(module).__name__}: {type(e).__name__}: "
                       f"{e}") from None
    if gm.code != evaluating:
        raise CutError(f"{type(module).__name__}.forward takes another path in eval mode (it "
                       "reads self.training); a trace holds one path only, so use torch's "
                       "layers (nn.Dropout, nn.BatchNorm2d) for what differs in training")
    return gm


def _writes_in_place(gm: fx.GraphModule, user: fx.Node, value: fx.Node) -> bool:
    """Whether ``user`` overwrites ``value`` (its first argument) in place."""
    if not user.args or user.args[0] is not value:
        return False
    if user.op == "call_module":
        return bool(getattr(gm.get_submodule(str(user.target)), "inplace", False))
    if user.op == "call_function":
        name = getattr(user.target, "__name__", "")
        return user.kwargs.get("inplace") is True or (name.endswith("_")
                                                     and not name.endswith("__"))
    if user.op == "call_method":
        name = str(user.target)
        return name.endswith("_") and not name.endswith("__")
    return False


def _stateful_targets(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    """Submodules and attributes with parameters or buffers that ``node`` uses."""
    out = []
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
            out.append(str(node.target))
    out += [str(a.target) for a in node.all_input_nodes if a.op == "get_attr"]
    return out


def _graph_io(gm: fx.GraphModule) -> tuple[fx.Node, fx.Node, list[fx.Node]]:
    """The one input, the one output value and the operations in between, in order."""
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise CutError(f"forward takes {len(inputs)} inputs "
                       f"({', '.join(n.name for n in inputs)}); a pipeline feeds it one tensor")
    result = nodes[-1].args[0]
    if not isinstance(result, fx.Node):
        raise CutError(f"forward returns {type(result).__name__} {result!r}; a pipeline "
                       "needs one tensor")
    body = [n for n in nodes if n.op not in ("placeholder", "output", "get_attr")]
    if not body:
        raise CutError("forward computes nothing")
    return inputs[0], result, body


def cut_points(gm: fx.GraphModule, sample: torch.Tensor) -> list[tuple[int, fx.Node]]:
    """``(p, value)`` for every point after ``body[p]`` where ``module`` may be cut, with the
    one tensor that crosses there (see the module docstring for the rules)."""
    inp, result, body = _graph_io(gm)
    with eval_mode(gm), torch.no_grad():
        ShapeProp(gm).propagate(sample)  # marks every node that yields a tensor
    pos = {n: i for i, n in enumerate(body)}
    pos[inp] = -1
    end = len(body)  # the output's position

    def last_use(n: fx.Node) -> int:
        uses = [pos.get(u, end) for u in n.users]
        return max(uses, default=pos[n])

    # a stateful submodule used at positions a..b forbids every cut in [a, b)
    spans: dict[str, list[int]] = {}
    for i, n in enumerate(body):
        for t in _stateful_targets(gm, n):
            spans.setdefault(t, [i, i])[1] = i
    tied = [False] * end
    for a, b in spans.values():
        for p in range(a, b):
            tied[p] = True
    ends = {n: last_use(n) for n in [inp, *body]}
    live = {inp} if ends[inp] > -1 else set()
    points = []
    for p, n in enumerate(body[:-1]):
        if ends[n] > p:
            live.add(n)
        live = {v for v in live if ends[v] > p}
        if len(live) != 1 or tied[p]:
            continue
        (value,) = live
        if not isinstance(value.meta.get("tensor_meta"), TensorMetadata):
            continue  # a size, a tuple of tensors, None...
        if any(_writes_in_place(gm, u, value) for u in value.users if pos.get(u, end) > p):
            continue
        points.append((p, value))
    return points


def _unit_name(module: nn.Module, nodes: Sequence[fx.Node]) -> str:
    """A traced unit's class name: the function of a one-operation unit (``relu``, so it is
    described as the zoo's layer of that name), else the class of the deepest submodule of
    ``module`` containing every submodule the unit uses, if it holds more than one of them
    (``BasicBlock``), else ``Unit``."""
    if len(nodes) == 1 and nodes[0].op in ("call_function", "call_method"):
        target = nodes[0].target
        return str(getattr(target, "__name__", target))
    paths = [str(n.target).split(".") for n in nodes if n.op == "call_module"]
    paths += [str(a.target).split(".")[:-1] for n in nodes for a in n.all_input_nodes
              if a.op == "get_attr"]
    common: list[str] = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if not common or all(p == common for p in paths):  # one layer and loose operations
        return "Unit"
    return type(module.get_submodule(".".join(common))).__name__


def _unit(module: nn.Module, gm: fx.GraphModule, nodes: Sequence[fx.Node], inp: fx.Node,
          out: fx.Node) -> nn.Module:
    """The module that maps ``inp`` to ``out`` through ``nodes``."""
    only = nodes[0]
    if (len(nodes) == 1 and only is out and only.op == "call_module" and only.args == (inp,)
            and not only.kwargs):
        return gm.get_submodule(str(only.target))
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {inp: graph.placeholder("x")}

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env and a.op == "get_attr":  # each unit reads its own attributes
            env[a] = graph.node_copy(a)
        return env[a]

    for n in nodes:
        env[n] = graph.node_copy(n, lookup)
    graph.output(env[out])
    return fx.GraphModule(gm, graph, class_name=_unit_name(module, nodes))


def cut(module: nn.Module, sample: torch.Tensor) -> list[nn.Module]:
    """The finest units of ``module`` (see the module docstring); ``sample`` is one input
    batch, used only to tell tensors from other values."""
    gm = trace(module)
    inp, result, body = _graph_io(gm)
    points = cut_points(gm, sample)
    units = []
    start, value = 0, inp
    for p, crossing in [*points, (len(body) - 1, result)]:
        units.append(_unit(module, gm, body[start:p + 1], value, crossing))
        start, value = p + 1, crossing
    return units
