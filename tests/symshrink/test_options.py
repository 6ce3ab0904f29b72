"""Typed options: the CLI's strings parsed at its edge, each method's values checked where they are declared,
flat keyword arguments routed to their method."""

import pytest

from symshrink.cli import _parser, compress_options
from symshrink.errors import BadInput
from symshrink.options import CompressOptions, HyperOptions, MomentOptions, TernaryOptions, WeightOptions, options_from


def _options(*argv: str) -> CompressOptions:
    return compress_options(_parser().parse_args(["compress", "m.onnx", "-o", "o.onnx", *argv]))


def test_cli_strings_become_typed_values():
    options = _options("--method", "moment,ternary", "--width-rule", "sqrt:16", "--block-size", "channel",
                       "--index-bits", "8,10", "--group-size", "64", "--exclude", "fc*")
    assert options.method == ("moment", "ternary")
    assert options.moment.sqrt_c == 16.0 and options.weights.block is None and options.weights.exclude == ("fc*",)
    assert options.hyper.index_bits == (8, 10) and options.hyper.group_size == 64
    assert _options("--target-size", "30MB").moment.target_size == 30_000_000
    assert _options("--target-size", "0.6").moment.target_size == 0.6
    assert _options("--block-size", "128").weights.block == 128
    assert _options("--method", "quant", "--bits", "2").quant.bits == 2
    assert not _options("--method", "quant").quant.zero_points
    assert _options("--method", "quant", "--zero-points", "--block-size", "16").quant.zero_points
    assert _options("--method", "quant").quant.act_order and not _options("--no-act-order").quant.act_order
    assert _options("--block-size", "16").weights.block == 16


@pytest.mark.parametrize("argv, message", [
    (["--width-rule", "log:2"], "sqrt:C"),
    (["--target-size", "half"], "--target-size"),
    (["--block-size", "48"], "block"),
    (["--index-bits", "8,x"], "--index-bits"),
    (["--keep", "1.5"], "keep"),
    (["--keep", "0.5", "--width", "3"], "one width rule"),
    (["--keep", "0.5", "--target-size", "0.5"], "budget of its own"),
    (["--ridge", "-1", "--keep", "0.5"], "ridge"),
    (["--method", "prune"], "unknown method"),
    (["--tensor-error", "0"], "tensor_error"),
])
def test_bad_values_are_bad_input(argv, message):
    with pytest.raises(BadInput, match=message):
        _options(*argv)


def test_flat_keywords_go_to_their_method():
    options = options_from(method=["ternary", "hyper"], block=32, exclude="fc1", index_bits=[8], keep=0.5, seed=3)
    assert options.method == ("ternary", "hyper") and options.seed == 3
    assert options.weights == WeightOptions(block=32, exclude=("fc1",)) and options.ternary == TernaryOptions()
    assert options.hyper == HyperOptions(index_bits=(8,)) and options.moment == MomentOptions(keep=0.5)
    with pytest.raises(BadInput, match="option block"):
        options_from(block="64")
    with pytest.raises(BadInput, match="unknown option block_size"):
        options_from(block_size=64)
