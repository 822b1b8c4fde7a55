"""The onnxruntime-CPU graph: exported ViT attention and GELU rewritten as onnxruntime contrib ops.

A graph transform like fp16 conversion: ``vitdeploy export`` applies :func:`fuse_for_cpu` to a
copy of the portable graph, validates the result against the eager model like the portable
graph, and writes it beside it (``model.cpu.onnx``, metadata ``target: onnxruntime-cpu``);
:class:`~vitdeploy.runtimes.onnxruntime.OrtRuntime` runs that file on its CPU provider. The
portable file, which TensorRT compiles, keeps the MatMul → Softmax → MatMul pattern.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from onnx import helper, numpy_helper

from vitdeploy.metadata import CPU_FUSION, CPU_VARIANT, ArtifactMetadata

from .graph import GraphIndex, Names, attr, topological

_MS_DOMAIN = "com.microsoft"
# Graph precisions that get an onnxruntime-CPU variant (fp16 graphs run their matmuls in fp32 on the
# CPU anyway, and fp8 is an emulation there).
CPU_VARIANT_PRECISIONS = ("fp32", "int8")
_SQRT2 = 2.0**0.5


def _biased_matmul(index: GraphIndex, name: str) -> tuple[str, str, Any] | None:
    """``name = Add(MatMul(..), bias)`` with a 1-D fp32 constant bias and the MatMul used once.

    Returns ``(matmul_output, bias_name, add_node)``.
    """
    add = index.produced_by(name, "Add")
    if add is None:
        return None
    for i, j in ((0, 1), (1, 0)):
        bias = index.const(add.input[j])
        if (bias is not None and bias.ndim == 1 and bias.dtype == np.float32
                and index.produced_by(add.input[i], "MatMul") is not None and index.uses(add.input[i]) == 1):
            return add.input[i], add.input[j], add
    return None


def _match_attention(index: GraphIndex, softmax: Any) -> dict[str, Any] | None:
    """The exporter's attention around ``softmax``, from the qkv projection to the merged heads.

    ``MatMul(x, W) + b -> Reshape [B,T,3,N,H] -> Transpose [2,0,3,1,4] -> q,k,v (Slice+Squeeze
    or Gather on axis 0) -> MatMul(q * scale, Transpose(k)) -> Softmax -> MatMul(., v) ->
    Transpose [0,2,1,3] -> Reshape [B,T,C]``.
    """
    if attr(softmax, "axis", -1) not in (-1, 3):
        return None
    scores = index.produced_by(softmax.input[0], "MatMul")
    weighted = index.only_consumer(softmax.output[0])
    if scores is None or index.uses(softmax.input[0]) != 1 or weighted is None or weighted.op_type != "MatMul":
        return None
    if weighted.input[0] != softmax.output[0]:
        return None
    mul = index.produced_by(scores.input[0], "Mul")
    k_t = index.produced_by(scores.input[1], "Transpose")
    if mul is None or k_t is None or list(attr(k_t, "perm", [])) != [0, 1, 3, 2]:
        return None
    q, scale = next(((mul.input[i], index.scalar(mul.input[1 - i])) for i in (0, 1)
                     if index.scalar(mul.input[1 - i]) is not None), (None, None))
    if q is None:
        return None
    picked, source = [], None
    for position, name in enumerate((q, k_t.input[0], weighted.input[1])):
        node = index.producers.get(name)
        if node is not None and node.op_type == "Squeeze":
            sliced = index.produced_by(node.input[0], "Slice")
            if sliced is None or len(sliced.input) < 4:
                return None
            starts, ends, axes = (index.const(n) for n in sliced.input[1:4])
            if starts is None or ends is None or axes is None or list(axes) != [0]:
                return None
            if (int(starts[0]), int(ends[0])) != (position, position + 1):
                return None
            picked += [node, sliced]
            origin = sliced.input[0]
        elif node is not None and node.op_type == "Gather" and attr(node, "axis", 0) == 0:
            chosen = index.const(node.input[1])
            if chosen is None or chosen.ndim != 0 or int(chosen) != position:
                return None
            picked.append(node)
            origin = node.input[0]
        else:
            return None
        if source not in (None, origin):
            return None
        source = origin
    heads_first = index.produced_by(source, "Transpose")
    if heads_first is None or list(attr(heads_first, "perm", [])) != [2, 0, 3, 1, 4]:
        return None
    if index.uses(source) != 3:
        return None
    split_heads = index.produced_by(heads_first.input[0], "Reshape")
    if split_heads is None or index.uses(heads_first.input[0]) != 1:
        return None
    shape = index.produced_by(split_heads.input[1], "Concat")
    dims = [index.const(n) for n in shape.input[2:]] if shape is not None and len(shape.input) == 5 else []
    if len(dims) != 3 or any(d is None or d.size != 1 for d in dims) or int(dims[0].item()) != 3:
        return None
    heads, head_dim = int(dims[1].item()), int(dims[2].item())
    merge = index.only_consumer(weighted.output[0])
    if merge is None or merge.op_type != "Transpose" or list(attr(merge, "perm", [])) != [0, 2, 1, 3]:
        return None
    merged = index.only_consumer(merge.output[0])
    if merged is None or merged.op_type != "Reshape":
        return None
    if index.uses(split_heads.input[0]) != 1:
        return None
    biased = _biased_matmul(index, split_heads.input[0])
    if biased is None:
        return None
    projection = index.producers[biased[0]]
    weight, quantized = _projection_weight(index, projection.input[1])
    hidden = heads * head_dim
    if weight is None or weight.shape != (hidden, 3 * hidden):
        return None
    return {
        "inputs": [projection.input[0], projection.input[1], biased[1]],
        "output": merged.output[0], "heads": heads, "scale": scale, "hidden": hidden,
        "quantized": quantized, "qkv": split_heads.input[0],
        "nodes": [projection, biased[2], split_heads, heads_first, *picked, mul, k_t, scores, softmax,
                  weighted, merge, merged],
    }


def _projection_weight(index: GraphIndex, name: str) -> tuple[np.ndarray | None, bool]:
    """The qkv projection's weight: an fp32 constant, or (``True``) an int8/uint8 constant behind a
    ``DequantizeLinear`` (a Q/DQ graph's linear layer); ``(None, False)`` for anything else (fp16)."""
    weight = index.const(name)
    if weight is not None:
        return (weight, False) if weight.dtype == np.float32 else (None, False)
    dequantize = index.produced_by(name, "DequantizeLinear")
    stored = index.const(dequantize.input[0]) if dequantize is not None else None
    if stored is None or stored.dtype not in (np.int8, np.uint8):
        return None, False
    return stored, True


def match_gelu(index: GraphIndex, node: Any) -> tuple[str, list[Any]] | None:
    """``x * 0.5 * (1 + Erf(x / sqrt(2)))`` (any operand order) or ONNX ``Gelu`` (exact) ending at ``node``.

    Returns ``(x, nodes)``.
    """
    if node.op_type == "Gelu" and node.domain in ("", "ai.onnx"):
        return (node.input[0], [node]) if attr(node, "approximate", b"none") in (b"none", "none") else None
    if node.op_type != "Mul":
        return None
    # Flatten the product: (x * 0.5) * (1 + erf) or x * (0.5 * (1 + erf)) or (x * (1 + erf)) * 0.5.
    factors, constants, nodes = [], [], [node]
    for name in node.input:
        inner = index.produced_by(name, "Mul")
        if inner is not None and index.uses(name) == 1:
            nodes.append(inner)
            for sub in inner.input:
                (constants if index.scalar(sub) is not None else factors).append(sub)
        else:
            (constants if index.scalar(name) is not None else factors).append(name)
    if len(factors) != 2 or len(constants) != 1 or abs(index.scalar(constants[0]) - 0.5) > 1e-6:
        return None
    for x, one_plus in (factors, factors[::-1]):
        add = index.produced_by(one_plus, "Add")
        if add is None or index.uses(one_plus) != 1:
            continue
        erf_out = next((add.input[i] for i in (0, 1) if index.scalar(add.input[1 - i]) == 1.0), None)
        erf = index.produced_by(erf_out, "Erf") if erf_out else None
        if erf is None or index.uses(erf_out) != 1 or index.uses(erf.input[0]) != 1:
            continue
        scaled = index.producers.get(erf.input[0])
        if scaled is None or len(scaled.input) != 2:
            continue
        if scaled.op_type == "Div" and scaled.input[0] == x and abs((index.scalar(scaled.input[1]) or 0) - _SQRT2) < 1e-5:
            return x, [*nodes, add, erf, scaled]
        if scaled.op_type == "Mul" and x in scaled.input:
            other = scaled.input[1] if scaled.input[0] == x else scaled.input[0]
            if abs((index.scalar(other) or 0) - 1 / _SQRT2) < 1e-5:
                return x, [*nodes, add, erf, scaled]
    return None


def _claim_attention_core(match: dict[str, Any], softmax: Any, claim: Any, names: Names,
                          initializers: list[Any]) -> bool:
    """Replace a quantized attention block's core (head split to head merge) with ``Split`` of the
    biased qkv output into q, k, v and one ``com.microsoft.MultiHeadAttention``."""
    base = softmax.name or "softmax"
    sizes = names.new(f"{base}/qkv_sizes")
    q, k, v = (names.new(f"{match['qkv']}_{part}") for part in "qkv")
    split = helper.make_node("Split", [match["qkv"], sizes], [q, k, v], name=names.new(f"{base}/Split"), axis=-1)
    attention = helper.make_node(
        "MultiHeadAttention", [q, k, v], [match["output"]], name=names.new(f"{base}/MultiHeadAttention"),
        domain=_MS_DOMAIN, num_heads=match["heads"], scale=float(match["scale"]))
    if not claim(match["nodes"][2:], match["nodes"][-1], split, attention):
        return False
    initializers.append(numpy_helper.from_array(np.full(3, match["hidden"], dtype=np.int64), sizes))
    return True


def fuse_for_cpu(model: Any) -> dict[str, int]:
    """Rewrite an exported fp32 ViT graph (``onnx.ModelProto``, in place) for onnxruntime's CPU EP.

    onnxruntime's own optimizer does not recognise the exporter's attention and GELU, so this
    replaces them with its contrib ops: each attention block (qkv projection + bias, head
    split, ``MatMul -> Softmax -> MatMul``, head merge) with one ``com.microsoft.Attention``;
    and ``bias + erf-GELU`` with ``com.microsoft.BiasGelu`` (``Gelu`` without a bias). In an
    int8 Q/DQ graph the qkv projection stays the int8 linear layer onnxruntime fuses
    (``MatMulIntegerToFloat``) and the rest of the attention block, from the head split to the
    head merge, becomes ``Split`` + ``com.microsoft.MultiHeadAttention`` (fp32, as the Q/DQ graph
    computes it); both count as ``attention``.
    (``SkipLayerNormalization`` and a three-input ``Sum`` for bias + residual were measured
    too and were slower on onnxruntime 1.32's CPU kernels.) Patterns that do not match
    exactly (fp16 graphs, other exporters) are left alone. Returns the number of rewrites of
    each kind. Meant for onnxruntime only: TensorRT needs the original pattern, which the
    portable file keeps (:func:`cpu_variant` makes the fused copy).
    """
    graph = model.graph
    index = GraphIndex(graph)
    counts = {"attention": 0, "gelu": 0}
    replaced: set[int] = set()
    added: dict[int, list[Any]] = {}  # id(anchor node) -> new nodes placed where the anchor was

    def claim(nodes: list[Any], anchor: Any, *new: Any) -> bool:
        """Replace ``nodes`` by ``new`` unless one is taken or an inner tensor is used outside them."""
        if any(id(n) in replaced for n in nodes):
            return False
        members = {id(n) for n in nodes}
        for inner in nodes:
            if inner is anchor:
                continue
            for name in inner.output:
                if name in index.outputs or any(id(c) not in members for c in index.consumers.get(name, [])):
                    return False
        replaced.update(id(n) for n in nodes)
        added.setdefault(id(anchor), []).extend(new)
        return True

    names = Names(graph)
    new_initializers: list[Any] = []

    for node in list(graph.node):
        if node.op_type == "Softmax":
            match = _match_attention(index, node)
            if match is not None and match["quantized"]:
                counts["attention"] += _claim_attention_core(match, node, claim, names, new_initializers)
            elif match is not None:
                attention = helper.make_node(
                    "Attention", match["inputs"], [match["output"]], name=f"{node.name or 'softmax'}/Attention",
                    domain=_MS_DOMAIN, num_heads=match["heads"], scale=float(match["scale"]),
                )
                counts["attention"] += claim(match["nodes"], match["nodes"][-1], attention)
    for node in list(graph.node):
        gelu = match_gelu(index, node)
        if gelu is None:
            continue
        x, nodes = gelu
        biased = _biased_matmul(index, x)
        if biased is not None and index.uses(x) == len([n for n in nodes if x in n.input]):
            new = helper.make_node("BiasGelu", [biased[0], biased[1]], [node.output[0]],
                                   name=f"{node.name or 'gelu'}/BiasGelu", domain=_MS_DOMAIN)
            nodes = [*nodes, biased[2]]
        else:
            new = helper.make_node("Gelu", [x], [node.output[0]], name=f"{node.name or 'gelu'}/Gelu", domain=_MS_DOMAIN)
        counts["gelu"] += claim(nodes, node, new)
    if not replaced:
        return counts

    nodes = []
    for node in graph.node:
        nodes.extend(added.get(id(node), []))
        if id(node) not in replaced:
            nodes.append(node)
    graph.initializer.extend(new_initializers)
    used = {name for node in nodes for name in node.input}
    kept = [init for init in graph.initializer if init.name in used or init.name in index.outputs]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    ordered = topological(graph, nodes)
    del graph.node[:]
    graph.node.extend(ordered)
    if not any(opset.domain == _MS_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS_DOMAIN, 1))
    return counts


def unfused_parts(model: Any, rope: bool | None = None) -> list[str]:
    """What of an exported graph the CPU fusion leaves as it is, and why (one phrase each; empty when
    nothing is known to be left): the attention of RoPE families (the rotation sits between the qkv
    projection and the scores, where onnxruntime's ``Attention`` takes no 2-D rotary input) and a
    SwiGLU MLP (no onnxruntime contrib op fuses SiLU gating). ``rope``: whether the model has RoPE (its
    config's); None guesses from Sin/Cos nodes (which a sin-cos position table has too)."""
    ops = {node.op_type for node in model.graph.node}
    parts = []
    if rope if rope is not None else {"Sin", "Cos"} <= ops:
        parts.append("attention with 2-D RoPE stays MatMul -> Softmax -> MatMul (onnxruntime's Attention op "
                     "takes no 2-D rotary input)")
    if "Sigmoid" in ops:
        parts.append("the SwiGLU MLP stays as exported (no onnxruntime contrib op fuses SiLU gating)")
    return parts


def cpu_variant(model: Any, metadata: ArtifactMetadata) -> tuple[Any, ArtifactMetadata] | None:
    """A fused copy of the portable graph ``model`` and its metadata, or ``None`` if nothing fuses.

    The copy's metadata says what it is: ``target`` ``onnxruntime-cpu`` and a
    ``transforms`` entry with the rewrite counts; its ``validation`` is for the caller to fill.
    """
    fused = copy.deepcopy(model)
    counts = fuse_for_cpu(fused)
    if not any(counts.values()):
        return None
    fused_metadata = copy.deepcopy(metadata)
    fused_metadata.target = CPU_VARIANT
    entry: dict[str, Any] = {"name": CPU_FUSION, "counts": counts}
    left = unfused_parts(model, metadata.model_config.get("rope") is not None)
    if left:
        entry["unfused"] = left
    fused_metadata.transforms = [*metadata.transforms, entry]
    fused_metadata.variants = {}
    fused_metadata.validation = None
    return fused, fused_metadata
