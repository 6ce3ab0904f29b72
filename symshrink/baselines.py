"""onnxruntime's own quantizers, the baselines users would pick instead: dynamic int8 (quantize_dynamic, per-channel,
reduce_range, MatMul only) and MatMulNBits (round-to-nearest per block of 32, symmetric, int8 compute; or its k-quant
search). One function each, file to file, on a copy of the model whose nodes all have names (MatMulNBits needs
them). Imported lazily by `symshrink sweep` and tools/bench.py."""

from __future__ import annotations

from pathlib import Path

import onnx

__all__ = ["NBITS_BLOCK", "ACCURACY_LEVEL", "BASELINES", "BASELINE_NAMES", "name_nodes", "quantize_int8", "quantize_nbits",
           "build_baseline"]

NBITS_BLOCK = 32  # MatMulNBits block size
ACCURACY_LEVEL = 4  # int8 compute for MatMulNBits (2- and 8-bit are very slow without it)
BASELINES = ("int8-dynamic", "nbits8", "nbits4-rtn-b32", "nbits2")  # what `sweep` puts beside its points
BASELINE_NAMES = ("int8-dynamic", "int8-dynamic-all", "nbits8", "nbits4-rtn-b32", "nbits4-rtn-b32-gather",
                  "nbits4-kquant", "nbits2")


def name_nodes(src: Path, dst: Path) -> Path:
    """A copy of the model whose nodes all have unique, non-empty names (MatMulNBits needs them)."""
    proto = onnx.load(str(src))
    seen: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for i, node in enumerate(graph.node):
            if not node.name or node.name in seen:
                base = f"{node.op_type}_{graph.name or 'g'}_{i}"
                name, k = base, 0
                while name in seen:
                    k += 1
                    name = f"{base}_{k}"
                node.name = name
            seen.add(node.name)
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    visit(sub)

    visit(proto.graph)
    big = proto.ByteSize() > 2**31 - 2**24
    onnx.save(proto, str(dst), save_as_external_data=big, location=dst.name + ".data" if big else None)
    return dst


def quantize_int8(named: Path, out: Path, matmul_only: bool = True) -> None:
    from onnxruntime.quantization import quantize_dynamic  # noqa: PLC0415

    ops = ["MatMul"] if matmul_only else None
    quantize_dynamic(named, out, per_channel=True, reduce_range=True, op_types_to_quantize=ops)


def quantize_nbits(named: Path, out: Path, bits: int, kquant: bool = False, gather: bool = False) -> None:
    """MatMulNBits of `bits` over every MatMul whose constant weight's K is in whole blocks (`gather`: embedding
    tables too, per row); RuntimeError when none is."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq  # noqa: PLC0415

    model = onnx.load(str(named))
    if kquant:
        config = mnq.KQuantWeightOnlyQuantConfig()
        quantizer = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=NBITS_BLOCK, is_symmetric=True,
                                             accuracy_level=ACCURACY_LEVEL, algo_config=config)
    else:  # DefaultWeightOnlyQuantConfig is round-to-nearest per block; gather: embedding tables too, per row
        ops = {"op_types_to_quantize": ("MatMul", "Gather"), "quant_axes": (("MatMul", 0), ("Gather", 1))} if gather else {}
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=NBITS_BLOCK, is_symmetric=True,
                                                  accuracy_level=ACCURACY_LEVEL, bits=bits, **ops)
        quantizer = mnq.MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    if not any(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node):
        raise RuntimeError("no MatMul was quantized (no constant 2-D weight with K divisible by the block)")
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)


def build_baseline(name: str, named: Path, out: Path) -> None:
    """One of `BASELINES` (and the bench's: nbits4-kquant, nbits4-rtn-b32-gather, int8-dynamic-all) into `out`."""
    builders = {
        "int8-dynamic": lambda: quantize_int8(named, out, matmul_only=True),
        "int8-dynamic-all": lambda: quantize_int8(named, out, matmul_only=False),
        "nbits4-rtn-b32": lambda: quantize_nbits(named, out, 4),
        "nbits4-rtn-b32-gather": lambda: quantize_nbits(named, out, 4, gather=True),
        "nbits4-kquant": lambda: quantize_nbits(named, out, 4, kquant=True),
        "nbits2": lambda: quantize_nbits(named, out, 2),
        "nbits8": lambda: quantize_nbits(named, out, 8),
    }
    builders[name]()
