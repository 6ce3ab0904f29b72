"""The method protocol and today's rules over it: every method offers candidates per site (bytes, predicted
error, payload) on a real graph; the rules choose among them as the methods always did."""

import numpy as np
import onnx_ir as ir
import pytest

from symshrink.calibration.stats import UnitStats
from symshrink.options import HyperOptions, MomentOptions
from symshrink.passes.analysis.groups import analyse
from symshrink.passes.analysis.weights import find_weight_sites
from symshrink.passes.hyper.codes import hyper_offer
from symshrink.passes.moment.plan import rewritable
from symshrink.passes.moment.reduce import moment_offer, unit_problem
from symshrink.passes.protocol import Candidate, Offer, Site, known
from symshrink.passes.ternary.codes import encode_ternary, encode_uint8, ternary_offer
from symshrink.rules import hyper_rule, moment_rule, ternary_rule
from symshrink.runtime.formats import HyperSetting
from tests.conftest import mlp_model
from tests.passes.ternary.test_ternary import _layer


def _model() -> ir.Model:
    return ir.from_proto(mlp_model(hidden=256, inputs=64, outputs=32))


def _never(_chosen) -> float:
    raise AssertionError("this rule needs no verification")


def test_moment_offers_every_width_with_its_bytes_and_curve_error():
    model = _model()
    groups = analyse(model)
    candidates = rewritable(groups, "moment", "select")
    nodes = {node.name: node for node in model.graph}
    stats = UnitStats(256)
    stats.add(np.maximum(np.random.default_rng(0).standard_normal((2000, 256)), 0))
    problems = {g.name: unit_problem(g, nodes, stats, 1e-3) for g in candidates}
    offer = moment_offer(candidates, groups, problems, "select", 1e-3)
    (site,) = offer.sites
    options = offer.candidates[site.name]
    assert [c.payload() for c in options] == list(range(256, 0, -1))
    assert options[0].bytes_after == site.bytes and options[-1].bytes_after == pytest.approx(site.bytes / 256, abs=1)
    errors = [c.predicted_error() for c in options]
    assert errors[0] == pytest.approx(0, abs=1e-9) and errors == sorted(errors)  # fewer units, more error
    chosen = moment_rule(offer, MomentOptions(keep=0.5), None, 10**6, lambda c: 0.0, _never)
    assert chosen[site.name].payload() == 128
    rewrite = offer.rewrite(chosen)
    assert rewrite.plan.groups[0].keep_width == 128


def test_ternary_offers_ternary_uint8_fp32_in_that_order_with_format_bytes():
    model = _model()
    sites, passed = find_weight_sites(model)
    nodes = {node.name: node for node in model.graph}
    offer = ternary_offer(sites, {}, nodes, 64, "none", "dequantize", passed)
    for site in offer.sites:
        methods = [c.method for c in offer.candidates[site.name]]
        assert methods == ["ternary", "uint8", "fp32"]
        ternary, uint8, fp32 = offer.candidates[site.name]
        assert ternary.bytes_after < uint8.bytes_after < fp32.bytes_after == site.bytes
        assert uint8.predicted_error() < ternary.predicted_error() and fp32.predicted_error() == 0
    assert [c.method for c in ternary_offer(sites, {}, nodes, 64, "none", "function", passed).candidates["fc1"]] \
        == ["ternary", "fp32"]


def _codec_offer(ternary_error: float, uint8_error: float | None) -> Offer:
    options = [Candidate("fc", "ternary", "t", 10, known(ternary_error), known("t"))]
    if uint8_error is not None:
        options.append(Candidate("fc", "uint8", "u", 40, known(uint8_error), known("u")))
    options.append(Candidate("fc", "fp32", "fp32", 160, known(0.0), known(None)))
    return Offer("ternary", [Site("fc", "weight", (8, 5), 160)], {"fc": options}, lambda chosen: None)


def test_ternary_rule_falls_back_by_the_layer_budget_and_says_why():
    _, weight, stats = _layer()
    ternary, uint8 = encode_ternary(weight, stats, 32, "lstsq"), encode_uint8(weight, stats, 32)
    assert uint8.relative_error < 0.02 < ternary.relative_error
    offer = _codec_offer(ternary.relative_error, uint8.relative_error)
    for budget, method, why in [(None, "ternary", ""), (0.05, "uint8", "ternary error"),
                                (uint8.relative_error / 2, "fp32", "8-bit")]:
        chosen, reasons = ternary_rule(offer, budget, None, _never)
        assert chosen["fc"].method == method and why in reasons.get("fc", "")
    chosen, reasons = ternary_rule(_codec_offer(0.5, None), 0.1, None, _never)
    assert chosen["fc"].method == "fp32" and "--storage dequantize" in reasons["fc"]


def test_ternary_rule_with_max_error_makes_the_least_damaging_layers_ternary_first():
    options = {name: [Candidate(name, "ternary", "t", 1, known(err), known(None)),
                      Candidate(name, "uint8", "u", 4, known(0.001), known(None)),
                      Candidate(name, "fp32", "fp32", 16, known(0.0), known(None))]
               for name, err in (("a", 0.3), ("b", 0.1), ("c", 0.2))}
    offer = Offer("ternary", [Site(n, "weight", (2, 2), 16) for n in options], options, lambda chosen: None)

    def error_of(chosen) -> float:  # the held-out error grows with the ternary layers' errors
        return sum(c.predicted_error() for c in chosen.values() if c.method == "ternary")

    chosen, reasons = ternary_rule(offer, None, 0.35, error_of)
    assert {n: c.method for n, c in chosen.items()} == {"a": "uint8", "b": "ternary", "c": "ternary"}
    assert "search kept it" in reasons["a"]


def test_hyper_offers_settings_and_the_rule_takes_the_fewest_bytes_within_the_target():
    model = _model()
    settings = [HyperSetting("lattice", (1 << b) // 4 - 1, 3, 4.0) for b in (6, 8, 10, 12)]
    offer, kept = hyper_offer(model, settings, None, min_elements=4096)
    assert [s.name for s in offer.sites] == ["W1", "W2"] and {t.name for t in kept} == {"b1", "b2"}
    options = offer.candidates["W1"]
    assert [c.bytes_after for c in options] == sorted(c.bytes_after for c in options)
    chosen = hyper_rule(offer, HyperOptions(tensor_error=0.05))
    pick = chosen["W1"]
    assert pick.predicted_error() <= 0.05
    assert all(c.predicted_error() > 0.05 for c in options if c.bytes_after < pick.bytes_after)
    rewrite = offer.rewrite(chosen)
    assert {t.name for t in rewrite.plan.coded()} == {"W1", "W2"}
