"""A run of a model's nodes as a model of its own: what the nodes read (subgraphs' outer-scope reads included), and
the ModelProto of those nodes alone, with only the weights they read embedded. Block-by-block calibration and the
hybrid runtime's onnxruntime partitions are such models.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["subgraphs", "nested_reads", "node_reads", "embedded_tensor", "subgraph_proto"]


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The graphs a node holds as attributes (If branches, Loop and Scan bodies)."""
    bodies = []
    for attribute in node.attributes.values():
        if attribute.type == ir.AttributeType.GRAPH:
            bodies.append(attribute.value)
        elif attribute.type == ir.AttributeType.GRAPHS:
            bodies.extend(attribute.value)
    return bodies


def _subgraph_reads(graph: ir.Graph) -> set[str]:
    """Names a subgraph reads from its outer scopes (If/Loop/Scan bodies)."""
    made = {v.name for v in graph.inputs} | set(graph.initializers)
    reads = set()
    for node in graph:
        reads |= {v.name for v in node.inputs if v is not None} | nested_reads(node)
        made |= {v.name for v in node.outputs}
    return reads - made


def nested_reads(node: ir.Node) -> set[str]:
    return set().union(*(_subgraph_reads(body) for body in subgraphs(node)))


def node_reads(node: ir.Node) -> set[str]:
    """Every value name a node reads: its inputs and those its subgraphs take from the outer scope."""
    return {v.name for v in node.inputs if v is not None and v.name} | nested_reads(node)


def embedded_tensor(value: ir.Value) -> onnx.TensorProto:
    """The initializer as a TensorProto with its bytes inside (read now from external data, if that is where it is)."""
    tensor = value.const_value
    if tensor.dtype == ir.DataType.STRING:
        return ir.serde.serialize_tensor(tensor)
    proto = onnx.TensorProto(name=value.name, dims=[int(d) for d in tensor.shape], data_type=int(tensor.dtype))
    proto.raw_data = tensor.tobytes()
    return proto


def subgraph_proto(model: ir.Model, nodes: Iterable[ir.Node], inputs: Sequence[str], outputs: Sequence[str],
                   input_types: Mapping[str, np.dtype], name: str = "subgraph") -> onnx.ModelProto:
    """A model of `nodes` alone (graph order): the weights they read embedded, `inputs` (values made elsewhere) as
    graph inputs of the dtypes given, `outputs` as graph outputs with the model's types and no shapes (the feeds
    decide them); the model's opsets and functions."""
    nodes = list(nodes)
    values = {v.name: v for v in model.graph.inputs} | {v.name: v for node in nodes for v in node.outputs}
    initializers = model.graph.initializers
    read = set().union(*(node_reads(node) for node in nodes))
    graph = onnx.GraphProto(name=name)
    graph.node.extend(ir.serde.serialize_node(node) for node in nodes)
    graph.initializer.extend(embedded_tensor(initializers[n]) for n in sorted(read & set(initializers)))
    for value_name in inputs:
        if value_name not in initializers:
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(input_types[value_name]))
            graph.input.append(onnx.helper.make_tensor_value_info(value_name, elem, None))
    for value_name in outputs:
        info = graph.output.add()
        if value_name in values and values[value_name].dtype is not None:
            ir.serde.serialize_value_into(info, values[value_name])
            info.type.tensor_type.ClearField("shape")
        info.name = value_name
    proto = onnx.ModelProto(ir_version=model.ir_version, graph=graph)
    for domain, version in model.opset_imports.items():
        proto.opset_import.add(domain=domain, version=version)
    proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    return proto
