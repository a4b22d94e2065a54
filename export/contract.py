"""Split an exported model into the three sub-models a server runs. Torch-free.

A server batches the localisation across requests of different image sizes and samples
each image at its own full resolution and any output size. The exported graph is one
piece (``image -> rectified, theta``); it is split along the tensors the contract names:

- ``resize``:    ``image`` [1, C, H, W]            -> ``loc_input`` [1, C, lh, lw]
- ``localiser``: ``loc_input`` [N, c, lh, lw]      -> ``theta``
- ``sampler``:   ``image``, ``theta``, ``base_grid`` [h, w, D] -> ``rectified`` [N, C, h, w]

``base_grid`` is an initializer in the full model (for the model's own output size); in
the sampler it is an input, so a caller feeds ``models.frames.base_grid`` of any size.
All three run the exported operators, the sampler's lowering included.

Channels: the localiser takes the model's ``c`` (``stn.in_channels``); ``resize`` and
``sampler`` declare C dynamic, since resizing and sampling act on every channel alike: a
server samples an upload in its own colour (1 or 3 channels) whatever the localiser takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from export.metadata import BASE_GRID, INPUT_IMAGE, LOC_INPUT, OUTPUT_RECTIFIED, OUTPUT_THETA, ModelInfo
from models.frames import base_grid_depth


class ContractError(ValueError):
    """The ONNX model does not have the tensors the stn contract names."""


@dataclass
class SubModels:
    resize: onnx.ModelProto
    localiser: onnx.ModelProto
    sampler: onnx.ModelProto


def _float_input(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def extract(model: onnx.ModelProto, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
            name: str) -> onnx.ModelProto:
    """The part of ``model`` computing ``outputs`` from ``inputs`` (and the model's initializers).

    An input may name an initializer: it then becomes a graph input instead.
    """
    graph = model.graph
    given = {vi.name for vi in inputs}
    producer = {out: node for node in graph.node for out in node.output}
    inits = {t.name: t for t in graph.initializer}
    needed_nodes: set[int] = set()
    needed_inits: set[str] = set()
    stack = [vi.name for vi in outputs]
    seen: set[str] = set()
    node_index = {id(n): i for i, n in enumerate(graph.node)}
    while stack:
        value = stack.pop()
        if value in seen or value == "" or value in given:
            continue
        seen.add(value)
        if value in inits:
            needed_inits.add(value)
            continue
        node = producer.get(value)
        if node is None:
            raise ContractError(f"{name}: {value!r} is needed but is neither computed, an initializer, nor given")
        needed_nodes.add(node_index[id(node)])
        stack.extend(node.input)
        for attr in node.attribute:  # subgraphs (If/Loop) read outer values too
            if attr.type == onnx.AttributeProto.GRAPH:
                raise ContractError(f"{name}: control flow ({node.op_type}) is not supported in stn graphs")
    nodes = [graph.node[i] for i in sorted(needed_nodes)]
    sub = helper.make_graph(nodes, name, list(inputs), list(outputs),
                            initializer=[inits[n] for n in sorted(needed_inits) if n not in given])
    result = helper.make_model(sub, opset_imports=list(model.opset_import), producer_name="stn",
                               ir_version=model.ir_version)
    if model.functions:
        result.functions.extend(model.functions)
    return result


def split(model: onnx.ModelProto, info: ModelInfo) -> SubModels:
    """Split an exported stn model into resize, localiser and sampler (see module docstring)."""
    names = {n for node in model.graph.node for n in (*node.input, *node.output)}
    names |= {t.name for t in model.graph.initializer}
    for required in (INPUT_IMAGE, LOC_INPUT, BASE_GRID, OUTPUT_THETA, OUTPUT_RECTIFIED):
        if required not in names:
            raise ContractError(f"model has no tensor named {required!r}: not an stn contract model (re-export it)")
    c = info.in_channels
    lh, lw = info.loc_size
    image = _float_input(INPUT_IMAGE, ["N", "C", "H", "W"])  # any C: see the module docstring
    loc_input = _float_input(LOC_INPUT, ["N", c, lh, lw])
    theta = _float_input(OUTPUT_THETA, ["N", *info.theta_shape])
    base_dim = base_grid_depth(info.transform, info.tps_grid)
    base_grid = _float_input(BASE_GRID, ["h", "w", base_dim])
    return SubModels(
        resize=extract(model, [image], [_float_input(LOC_INPUT, ["N", "C", lh, lw])], "stn_resize"),
        localiser=extract(model, [loc_input], [theta], "stn_localiser"),
        sampler=extract(model, [image, theta, base_grid], [_float_input(OUTPUT_RECTIFIED, ["N", "C", "h", "w"])],
                        "stn_sampler"),
    )
