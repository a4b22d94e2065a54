"""The sampler on the native ops (``ai.stn``, the ``native`` package's library). Torch-free.

- :func:`sampler_model`: the contract's sampler sub-model ``image, theta, base_grid -> rectified``
  built on the native ops, whatever lowering the file was exported with (the service and batch
  jobs use it when the library is present). Affine-like and projective families: one fused
  ``ai.stn::Warp`` (coordinates from theta on the fly, the base grid only gives the output size);
  TPS: the grid generator (``Einsum`` of base grid and control points) then ``ai.stn::GridSample``.
- :func:`fuse_warp`: in a model exported with ``--grid-sample native``, replace the grid generator
  and ``ai.stn::GridSample`` of an affine-like or projective model by ``ai.stn::Warp``.
- :func:`uses_native`: whether a model needs the library.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from export.metadata import BASE_GRID, INPUT_IMAGE, OUTPUT_RECTIFIED, OUTPUT_THETA, ModelInfo
from models.frames import HOMOGENEOUS_FAMILIES, base_grid_depth

DOMAIN = "ai.stn"  # native.DOMAIN (not imported: export must not need the library to describe it)
OPSET = 1


def uses_native(model: onnx.ModelProto) -> bool:
    """True when ``model`` has an ``ai.stn`` op (and so needs the native library to run)."""
    return any(n.domain == DOMAIN for n in model.graph.node) or any(
        n.domain == DOMAIN for f in model.functions for n in f.node)


def op_name(info: ModelInfo) -> str:
    """The native op that samples ``info``'s family: ``ai.stn::Warp`` or ``ai.stn::GridSample``."""
    return f"{DOMAIN}::{'Warp' if info.transform in HOMOGENEOUS_FAMILIES else 'GridSample'}"


def _attrs(info: ModelInfo) -> dict:
    return {"mode": info.interpolation, "padding_mode": info.padding_mode, "align_corners": int(info.align_corners)}


def sampler_nodes(info: ModelInfo, image: str, theta: str, base_grid: str, output: str) -> list[onnx.NodeProto]:
    """Nodes computing ``output`` from ``image``, ``theta`` and ``base_grid`` on the native ops."""
    if info.transform in HOMOGENEOUS_FAMILIES:
        return [helper.make_node("Warp", [image, theta, base_grid], [output], domain=DOMAIN, name="stn_native_warp",
                                 **_attrs(info))]
    grid = output + "_native_grid"
    return [helper.make_node("Einsum", [base_grid, theta], [grid], equation="hwk,nkc->nhwc", name="stn_native_grid"),
            helper.make_node("GridSample", [image, grid], [output], domain=DOMAIN, name="stn_native_sample",
                             **_attrs(info))]


def sampler_model(info: ModelInfo, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """The sampler sub-model ``image [N,C,H,W], theta, base_grid [h,w,D] -> rectified [N,C,h,w]`` (any C).

    ``like``: the exported model it stands in for; its standard opset and IR version are kept (else 18 and 8).
    """
    opset = next((o.version for o in like.opset_import if o.domain in ("", "ai.onnx")), 18) if like else 18
    ir_version = like.ir_version if like else 8
    f = TensorProto.FLOAT
    base_dim = base_grid_depth(info.transform, info.tps_grid)
    graph = helper.make_graph(
        sampler_nodes(info, INPUT_IMAGE, OUTPUT_THETA, BASE_GRID, OUTPUT_RECTIFIED), "stn_sampler_native",
        [helper.make_tensor_value_info(INPUT_IMAGE, f, ["N", "C", "H", "W"]),
         helper.make_tensor_value_info(OUTPUT_THETA, f, ["N", *info.theta_shape]),
         helper.make_tensor_value_info(BASE_GRID, f, ["h", "w", base_dim])],
        [helper.make_tensor_value_info(OUTPUT_RECTIFIED, f, ["N", "C", "h", "w"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, OPSET)],
                             ir_version=ir_version, producer_name="stn")


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers that no graph output depends on."""
    producer = {o: n for n in graph.node for o in n.output}
    needed: set[str] = set()
    stack = [o.name for o in graph.output]
    while stack:
        v = stack.pop()
        if v in needed:
            continue
        needed.add(v)
        if v in producer:
            stack.extend(i for i in producer[v].input if i)
    keep = [n for n in graph.node if any(o in needed for o in n.output)]
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    vis = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(vis)


def fuse_warp(model: onnx.ModelProto, info: ModelInfo) -> bool:
    """Replace grid generator + ``ai.stn::GridSample`` by ``ai.stn::Warp`` (affine-like, projective).

    The sampled image is the GridSample's own input; theta and the base grid are the contract's
    tensors. Returns False (model unchanged) for TPS or when there is no native GridSample.
    """
    if info.transform not in HOMOGENEOUS_FAMILIES:
        return False
    graph = model.graph
    samplers = [n for n in graph.node if n.domain == DOMAIN and n.op_type == "GridSample"]
    if len(samplers) != 1:
        return False
    node = samplers[0]
    warp = sampler_nodes(info, node.input[0], OUTPUT_THETA, BASE_GRID, node.output[0])[0]
    index = list(graph.node).index(node)
    graph.node.remove(node)
    graph.node.insert(index, warp)
    _prune(graph)
    return True
