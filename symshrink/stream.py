"""Block by block: run feeds through a model one block of nodes at a time (`analysis.blocks.partition`), each block
its own onnxruntime session over only its weights, the values live between blocks kept per feed (in memory up to a
limit, then in .npy files read back memory-mapped). Peak memory is one block's weights and sessions plus the live
values, whatever the model's size: what calibration and verification of models larger than memory need.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from symshrink.errors import BadInput
from symshrink.modelio import TWO_GB
from symshrink.options import CompressOptions
from symshrink.passes.analysis.blocks import Block, partition
from symshrink.runtime.ort import session_options
from symshrink.runtime.subgraph import subgraph_proto

__all__ = ["Spool", "CodeSpill", "block_proto", "block_session", "stream_blocks", "stream_outputs", "graph_outputs",
           "DEFAULT_BLOCK_BYTES"]

DEFAULT_BLOCK_BYTES = CompressOptions.block_bytes  # weights per block: a layer of a 1B fp16 model, several of 135M
SPOOL_MEMORY_BYTES = 1 << 30  # live values kept in memory before they go to disk


class Spool:
    """Per feed, the values live between two blocks. Arrays are kept in memory until `memory_bytes` of them are,
    then written to .npy files in a temporary folder (removed with the spool) and read back memory-mapped."""

    def __init__(self, memory_bytes: int = SPOOL_MEMORY_BYTES):
        self.memory_bytes = memory_bytes
        self.held = 0
        self.feeds: list[dict[str, np.ndarray]] = []
        self._folder: tempfile.TemporaryDirectory | None = None

    def append(self, values: dict[str, np.ndarray]) -> None:
        kept = {}
        for name, array in values.items():
            array = np.asarray(array)
            if self.held + array.nbytes > self.memory_bytes and array.nbytes > 0 and array.dtype != object:
                kept[name] = self._to_disk(len(self.feeds), name, array)
            else:
                self.held += array.nbytes
                kept[name] = array
        self.feeds.append(kept)

    def _to_disk(self, index: int, name: str, array: np.ndarray) -> np.ndarray:
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="symshrink-spool-")
        path = Path(self._folder.name) / f"{index}-{abs(hash(name)):x}-{len(os.listdir(self._folder.name))}.npy"
        np.save(path, array)
        return np.load(path, mmap_mode="r")

    def close(self) -> None:
        self.feeds = []
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def __iter__(self):
        return iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)


class CodeSpill:
    """The coded weights written so far, moved out of memory: each new initializer of at least `min_bytes` is appended
    to one file in a temporary folder and becomes an external tensor there (read back, memory-mapped, when the model
    is saved). `close()` removes the folder: after the save."""

    def __init__(self, min_bytes: int = 1 << 16):
        self.min_bytes = min_bytes
        self._folder = tempfile.TemporaryDirectory(prefix="symshrink-codes-")
        self._file = open(Path(self._folder.name) / "codes.bin", "wb")
        self.offset = 0

    def spill(self, model: ir.Model, kept: set[str]) -> None:
        """Move the initializers not in `kept` (those the last write added) to the file."""
        for name, value in model.graph.initializers.items():
            tensor = value.const_value
            if name in kept or tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < self.min_bytes:
                continue
            data = tensor.tobytes()
            self._file.write(data)
            self._file.flush()
            value.const_value = ir.ExternalTensor("codes.bin", self.offset, len(data), tensor.dtype, shape=tensor.shape,
                                                  name=name, base_dir=self._folder.name)
            self.offset += len(data)

    def close(self) -> None:
        self._file.close()
        self._folder.cleanup()


def block_proto(model: ir.Model, block: Block, outputs: Sequence[str], input_types: dict[str, np.dtype]) -> onnx.ModelProto:
    """A model of the block's nodes alone: its weights embedded, its live inputs as graph inputs (of the dtypes the
    feeds have), `outputs` as graph outputs."""
    return subgraph_proto(model, block.all_nodes, block.inputs, outputs, input_types, name="block")


def block_session(model: ir.Model, block: Block, outputs: Sequence[str], input_types: dict[str, np.dtype],
                  threads: int | None, optimize: bool = True) -> ort.InferenceSession:
    """An onnxruntime session of the block (from bytes: one block's weights in memory, nothing on disk)."""
    if block.weight_bytes >= TWO_GB:
        raise BadInput(f"a block of --stream needs {block.weight_bytes / 1e9:.1f} GB of weights at once (one weight "
                       "or a constant computed from them): more than a protobuf holds; not supported yet")
    data = block_proto(model, block, outputs, input_types).SerializeToString()
    try:
        return ort.InferenceSession(data, session_options(threads, optimize), providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 (onnxruntime raises its own exception classes for invalid graphs)
        raise BadInput(f"onnxruntime cannot load a block of this model: {str(err).splitlines()[0]}") from None


def stream_blocks(model: ir.Model, blocks: Sequence[Block], feeds: Iterable[dict[str, np.ndarray]],
                  threads: int | None = None, probes: Callable[[int, Block], Sequence[str]] | None = None,
                  on_feed: Callable[[int, int, dict[str, np.ndarray]], None] | None = None,
                  on_block: Callable[[int, Block], None] | None = None,
                  memory_bytes: int = SPOOL_MEMORY_BYTES, last_block: Callable[[int], int] | None = None,
                  optimize: bool = True) -> Spool:
    """Run `feeds` through the blocks in order. Per block, `probes(i, block)` names values (the block's inputs or
    values it makes) handed to `on_feed(i, feed index, arrays)` as each feed has run (one feed's in memory at a time);
    then `on_block(i, block)`, before the next block is built (a rewrite of block i may happen there). A feed runs up
    to block `last_block(feed index)` (default: all). Returns the values live after the last block (the graph
    outputs), per feed ({} for feeds that stopped before it). Calibration runs unoptimised (`optimize`): the values
    are then those of the whole model's unoptimised session, wherever the cuts fall (`runtime.ort.stream_probes`).
    Spooled files are removed on the way out of an error."""
    last_block = last_block or (lambda index: len(blocks))
    spool = Spool(memory_bytes)
    try:
        for feed in feeds:
            spool.append({name: np.asarray(array) for name, array in feed.items()})
        for i, block in enumerate(blocks):
            asked = list(probes(i, block)) if probes is not None else []
            outputs = list(dict.fromkeys([*block.outputs, *(name for name in asked if name not in block.inputs)]))
            types = {name: values[name].dtype for values in reversed(spool.feeds) for name in block.inputs
                     if name in values}
            session = block_session(model, block, outputs, types, threads, optimize) if outputs else None
            after = Spool(memory_bytes)
            spool, previous = after, spool
            for index, values in enumerate(previous):
                if last_block(index) < i:
                    after.append({})
                    continue
                last = last_block(index) == i
                # a feed's last block is not run when all it asks of it are the block's inputs (a head's moments)
                run = session is not None and not (last and all(name in values for name in asked))
                feed = {name: values[name] for name in block.inputs if name in values}
                results = dict(zip(outputs, session.run(outputs, feed))) if run else {}
                if on_feed is not None and asked:
                    on_feed(i, index, {name: results[name] if name in results else values[name] for name in asked})
                after.append({} if last else {name: values[name] for name in block.carried if name in values}
                             | {name: results[name] for name in block.outputs})
                del results
            del session
            previous.close()
            if on_block is not None:
                on_block(i, block)
        return spool
    except BaseException:
        spool.close()
        raise


def graph_outputs(model: ir.Model, feeds: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The graph's outputs from the values live after the last block, per feed (an output that is a weight from the
    model itself)."""
    initializers = model.graph.initializers
    return [{v.name: np.asarray(values[v.name]) if v.name in values else initializers[v.name].const_value.numpy()
             for v in model.graph.outputs} for values in feeds]


def stream_outputs(model: ir.Model, feeds: Sequence[dict[str, np.ndarray]], threads: int | None = None,
                   block_bytes: int = DEFAULT_BLOCK_BYTES, optimize: bool = True) -> list[dict[str, np.ndarray]]:
    """The model's outputs for each feed, computed block by block (graph output order)."""
    spool = stream_blocks(model, partition(model.graph, block_bytes), feeds, threads, optimize=optimize)
    outputs = graph_outputs(model, spool.feeds)
    spool.close()
    return outputs
