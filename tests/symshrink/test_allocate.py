"""The Lagrangian allocator on synthetic candidate lists: each plan optimal for its own distortion (checked by brute
force), monotone in the multiplier, and the search never returning a plan its test rejects."""

import itertools
import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from symshrink.allocate import allocate, allocate_bytes, breakpoints, lagrangian_choice, scaled_error, squared_error
from symshrink.errors import BadInput
from symshrink.passes.protocol import Candidate, known


def _instance(seed: int, sites: int = 4, options: int = 4) -> dict[str, list[Candidate]]:
    """Sites with fp32 (no error) and codes of fewer bytes and more error, at random."""
    rng = np.random.default_rng(seed)
    instance = {}
    for s in range(sites):
        dense = int(rng.integers(1000, 5000))
        codes = [Candidate(f"s{s}", "fp32", "fp32", dense, known(0.0), known(None))]
        for o in range(options - 1):
            codes.append(Candidate(f"s{s}", "code", f"c{o}", int(rng.integers(50, dense)), known(float(rng.uniform(0, 0.3))),
                                   known(None)))
        instance[f"s{s}"] = codes
    return instance


def _totals(choice) -> tuple[int, float]:
    return sum(c.bytes_after for c in choice.values()), sum(squared_error(c) for c in choice.values())


def _plans(instance):
    """Every lagrangian plan: one per interval between breakpoints, and the two ends."""
    points = breakpoints(instance)
    multipliers = [0.0] + [(a + b) / 2 for a, b in zip(points, points[1:])] + [math.inf]
    return [lagrangian_choice(instance, lam) for lam in multipliers]


@pytest.mark.parametrize("seed", range(12))
def test_each_plan_has_the_fewest_bytes_of_all_choices_within_its_distortion(seed):
    instance = _instance(seed)
    every = [dict(zip(instance, combo)) for combo in itertools.product(*instance.values())]  # 4^4 choices
    for plan in _plans(instance):
        nbytes, distortion = _totals(plan)
        rivals = [_totals(c)[0] for c in every if _totals(c)[1] <= distortion + 1e-12]
        assert nbytes == min(rivals)


@pytest.mark.parametrize("seed", range(6))
def test_bytes_rise_and_distortion_falls_with_the_multiplier(seed):
    plans = _plans(_instance(seed, sites=6, options=5))
    totals = [_totals(plan) for plan in plans]
    assert all(a[0] <= b[0] and a[1] >= b[1] for a, b in zip(totals, totals[1:]))
    labels = [tuple(c.setting for c in plan.values()) for plan in plans]
    assert len(set(labels)) == len(labels)  # every breakpoint changes the plan: none is missing or spurious
    assert totals[-1][1] == 0.0  # at the far end every site keeps fp32 (no error)


@pytest.mark.parametrize("seed", range(6))
def test_allocate_finds_the_smallest_plan_within_the_budget_in_few_tests(seed):
    instance = _instance(seed, sites=8, options=4)
    plans = _plans(instance)
    budget = float(np.median([_totals(p)[1] for p in plans]))
    calls = []

    def accepts(choice) -> bool:
        calls.append(choice)
        return _totals(choice)[1] <= budget

    result = allocate(instance, accepts)
    within = [p for p in plans if _totals(p)[1] <= budget]
    assert result.choice is not None and _totals(result.choice)[1] <= budget
    assert _totals(result.choice)[0] == min(_totals(p)[0] for p in within)
    assert result.tests == len(calls) <= 2 + math.ceil(math.log2(len(plans)))


def test_allocate_returns_nothing_when_even_the_least_distortion_fails():
    coded_only = {site: options[1:] for site, options in _instance(0).items()}  # no fp32: every plan has error
    result = allocate(coded_only, lambda choice: False)
    assert result.choice is None and result.tests == 1


def test_the_unchanged_plan_is_taken_untested_when_nothing_else_passes():
    calls = []
    result = allocate(_instance(0), lambda choice: calls.append(choice) or False)
    assert all(c.method == "fp32" for c in result.choice.values())  # the caller reports it as no plan within
    assert calls and all(any(c.method != "fp32" for c in choice.values()) for choice in calls)
    assert result.tests == len(calls)


def test_a_site_with_one_option_and_dominated_options_are_handled():
    only = [Candidate("a", "fp32", "fp32", 100, known(0.0), known(None))]
    dominated = [Candidate("b", "fp32", "fp32", 100, known(0.0), known(None)),
                 Candidate("b", "code", "worse", 120, known(0.2), known(None)),  # more bytes and more error
                 Candidate("b", "code", "good", 40, known(0.1), known(None))]
    instance = {"a": only, "b": dominated}
    assert breakpoints(instance) == pytest.approx([60 / 0.01])
    assert [c.setting for c in lagrangian_choice(instance, 0.0).values()] == ["fp32", "good"]
    assert [c.setting for c in lagrangian_choice(instance, math.inf).values()] == ["fp32", "fp32"]
    assert all(c.setting != "worse" for plan in _plans(instance) for c in plan.values())


def test_quant_with_max_error_alone_allocates_bits_per_layer_within_the_held_out_budget():
    from symshrink.api import compress  # noqa: PLC0415
    from tests.conftest import mlp_model  # noqa: PLC0415

    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((16, 64)).astype(np.float32)} for _ in range(20)]
    sizes, plans = [], []
    for budget in (0.02, 0.08, 0.2, 0.4):
        proto, report = compress(mlp_model(hidden=256, inputs=64, outputs=32, seed=2), feeds, method="quant",
                                 max_error=budget, block=32, progress=False)
        assert report.failures == [] and max(d.rel_l2 for d in report.diffs) <= budget
        assert all("allocated within" in layer.reason for layer in report.quant.layers)
        sizes.append(proto.ByteSize())
        plans.append([layer.codec for layer in report.quant.layers])
        trials = report.quant.trials
        assert trials and all(t["measured"] <= budget for t in trials if t["within"]) and "allocation trial" in str(report.quant)
        assert [(c["kind"], c["bits"]) for c in report.quant.calibration] == [("product", 4), ("product", 2)]
    # measured: 8/8 bits (held-out 0.010), 8/4 (0.068), 4/4 (0.113), 4/2 (0.292)
    assert plans[0] == ["uint8", "uint8"] and "uint2" in plans[-1]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_the_allocation_holds_the_cosine_gate_and_leaves_stacked_hyper_to_the_grid_rule():
    from symshrink.api import compress  # noqa: PLC0415
    from tests.conftest import mlp_model  # noqa: PLC0415

    rng = np.random.default_rng(4)
    feeds = [{"x": rng.standard_normal((16, 64)).astype(np.float32)} for _ in range(20)]
    _, report = compress(mlp_model(hidden=256, inputs=64, outputs=32, seed=2), feeds, method="quant", min_cosine=0.999,
                         block=32, progress=False)
    assert report.failures == [] and min(d.cosine for d in report.diffs) >= 0.999
    assert all("allocated within held-out cosine 0.999" in layer.reason for layer in report.quant.layers)
    _, stacked = compress(mlp_model(hidden=256, inputs=64, outputs=32, seed=2), feeds, method="quant,hyper",
                          max_error=0.5, bits=4, block=32, index_bits=(12,), progress=False)
    assert {layer.codec for layer in stacked.quant.layers} == {"uint4"}  # the asked grid: --max-error is the gate


@pytest.mark.parametrize("seed", range(6))
def test_allocate_bytes_takes_the_least_distortion_plan_that_fits(seed):
    instance = _instance(seed, sites=5, options=4)
    plans = _plans(instance)
    for plan in plans[1:-1]:
        nbytes = _totals(plan)[0]
        found = allocate_bytes(instance, nbytes).choice
        assert _totals(found)[0] <= nbytes
        fitting = [p for p in plans if _totals(p)[0] <= nbytes]
        assert _totals(found)[1] == min(_totals(p)[1] for p in fitting)
    assert allocate_bytes(instance, _totals(plans[0])[0] - 1).choice is None  # below the fewest bytes: nothing


def test_scaled_error_weighs_each_site_by_its_scale():
    instance = _instance(0, sites=2, options=3)
    code = instance["s0"][1]
    by_site = {"s0": 2.0}
    assert scaled_error(lambda c: by_site.get(c.site, 1.0))(code) == pytest.approx(4 * squared_error(code))
    assert scaled_error(lambda c: 1.0)(instance["s1"][1]) == pytest.approx(squared_error(instance["s1"][1]))


def _feeds(seed: int, inputs: int = 64) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((16, inputs)).astype(np.float32)} for _ in range(20)]


def test_no_method_and_no_budget_is_the_allocator_within_the_default_cosine():
    from symshrink.api import compress  # noqa: PLC0415
    from symshrink.options import DEFAULT_MIN_COSINE  # noqa: PLC0415
    from tests.conftest import mlp_model  # noqa: PLC0415

    proto, report = compress(mlp_model(hidden=256, inputs=64, outputs=32, seed=2), _feeds(5), progress=False)
    assert report.methods == ["quant"] and report.passed
    assert min(d.cosine for d in report.diffs) >= DEFAULT_MIN_COSINE
    assert all(f"cosine {DEFAULT_MIN_COSINE:g}" in layer.reason for layer in report.quant.layers)
    assert [c["kind"] for c in report.quant.calibration] == ["product", "product"]  # at 4 and 2 bits
    assert proto.ByteSize() < 0.3 * mlp_model(hidden=256, inputs=64, outputs=32, seed=2).ByteSize()
    onnx.checker.check_model(proto)


def test_a_target_size_takes_the_least_distorted_plan_that_fits():
    from symshrink.api import compress  # noqa: PLC0415
    from tests.conftest import mlp_model  # noqa: PLC0415

    model = mlp_model(hidden=256, inputs=64, outputs=32, seed=2)
    errors, sizes = [], []
    for target in (0.12, 0.2, 0.4):
        proto, report = compress(model, _feeds(6), method="quant", target_size=target, progress=False)
        assert proto.ByteSize() <= target * model.ByteSize()
        assert all("target size" in layer.reason for layer in report.quant.layers)
        errors.append(max(d.rel_l2 for d in report.diffs))
        sizes.append(proto.ByteSize())
    assert errors == sorted(errors, reverse=True) and errors[0] > 2 * errors[-1]  # more bytes, less error
    with pytest.raises(BadInput, match="out of reach"):
        compress(model, _feeds(6), method="quant", target_size=500, progress=False)


def _adversarial_model(seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul W1 -> Mul 40 -> Tanh -> MatMul W2 -> y. The steep Tanh turns W1's small output error into a large
    one downstream: W1's predicted error (on its own output) underestimates its effect on y."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((64, 256)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((256, 32)) / 16).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="steep"),
             helper.make_node("Mul", ["h", "gain"], ["g"], name="gain"),
             helper.make_node("Tanh", ["g"], ["t"], name="tanh"),
             helper.make_node("MatMul", ["t", "W2"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "adversarial", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])],
                              [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
                               numpy_helper.from_array(np.array(40.0, np.float32), "gain")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("budget", [0.02, 0.05, 0.15])
def test_the_held_out_error_stays_within_the_budget_where_the_predictor_underestimates(budget):
    from symshrink.api import compress  # noqa: PLC0415

    _, report = compress(_adversarial_model(), _feeds(7), method="quant", max_error=budget, progress=False)
    assert report.passed and max(d.rel_l2 for d in report.diffs) <= budget
    steep = next(layer for layer in report.quant.layers if layer.node == "steep")
    calibration = report.quant.calibration[0]
    assert calibration["measured"] > 2 * calibration["predicted"]  # the predictor is fooled: the scale corrects it
    assert all(t["measured"] <= budget for t in report.quant.trials if t["within"])
    assert steep.codec != "uint2"  # the steep layer keeps its bits


def test_the_report_tables_every_site_and_a_recorded_plan_replays_byte_identically(tmp_path):
    from symshrink.cli import main  # noqa: PLC0415
    from tests.conftest import mlp_model  # noqa: PLC0415

    path, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(mlp_model(hidden=256, inputs=64, outputs=32, seed=2), path)
    np.savez(calib, x=np.random.default_rng(8).standard_normal((320, 64)).astype(np.float32))
    first, again = tmp_path / "a.onnx", tmp_path / "b.onnx"
    common = ["--calib", str(calib), "-q"]
    assert main(["compress", str(path), "-o", str(first), "--plan-out", str(tmp_path / "plan.json"),
                 "--report", str(tmp_path / "r.html"), *common]) == 0
    assert main(["compress", str(path), "-o", str(again), "--plan", str(tmp_path / "plan.json"), "--method", "quant",
                 "--report", str(tmp_path / "r.md"), *common]) == 0
    assert main(["compress", str(path), "-o", str(tmp_path / "m.onnx"), "--plan", str(tmp_path / "plan.json"),
                 *common]) == 2  # without --method the plan is read as widths: refused with a sentence
    assert first.read_bytes() == again.read_bytes()
    page, text = (tmp_path / "r.html").read_text(), (tmp_path / "r.md").read_text()
    assert page.count("<tr>") == 1 + 2 and "fc1" in page and "<h2>Weight sites</h2>" in page  # header + 2 sites
    assert "| fc1 | MatMul | 64x256 |" in text and "replayed from the plan" in text
    plan = json.loads((tmp_path / "plan.json").read_text())
    plan["layers"][0]["setting"] = "3-bit fed back b64"  # not a setting this model is offered
    (tmp_path / "bad.json").write_text(json.dumps(plan))
    assert main(["compress", str(path), "-o", str(tmp_path / "c.onnx"), "--plan", str(tmp_path / "bad.json"),
                 "--method", "quant", *common]) == 2
    for broken in ({"rounding": "feedback", "layers": [{}]}, {"rounding": "feedback", "layers": ["a"]}):
        (tmp_path / "broken.json").write_text(json.dumps(broken))
        assert main(["compress", str(path), "-o", str(tmp_path / "c.onnx"), "--plan", str(tmp_path / "broken.json"),
                     "--method", "quant", *common]) == 2
    assert not (tmp_path / "c.onnx").exists()


def test_given_bits_fix_every_layer_and_a_gate_only_verifies():
    from symshrink.api import compress  # noqa: PLC0415
    from tests.conftest import mlp_model  # noqa: PLC0415

    _, report = compress(mlp_model(hidden=256, inputs=64, outputs=32, seed=2), _feeds(9), method="quant", bits=2,
                         min_cosine=0.5, progress=False)
    assert [layer.codec for layer in report.quant.layers] == ["uint2", "uint2"] and not report.quant.trials
    _, report = compress(mlp_model(hidden=256, inputs=64, outputs=32, seed=2), _feeds(9), method="quant",
                         min_cosine=0.5, progress=False)
    assert report.quant.trials  # no --bits: the gate is the allocator's budget


def test_a_task_budget_is_measured_in_every_trial_and_at_the_end():
    import onnxruntime as ort  # noqa: PLC0415

    from symshrink.api import compress  # noqa: PLC0415
    from tests.conftest import mlp_model  # noqa: PLC0415

    model = mlp_model(hidden=256, inputs=64, outputs=32, seed=2)
    x = np.random.default_rng(11).standard_normal((512, 64)).astype(np.float32)
    labels = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0].argmax(axis=1)

    def agreement(session) -> float:  # the user's metric: top-1 agreement with the original's labels
        return float(np.mean(session.run(None, {"x": x})[0].argmax(axis=1) == labels))

    _, report = compress(model, _feeds(10), method="quant", max_loss=0.02, task=agreement, progress=False)
    assert report.passed and report.task["reference"] == 1.0 and report.task["loss"] <= 0.02
    assert all("task_loss" in t for t in report.quant.trials)
    assert all(t["task_loss"] <= 0.02 for t in report.quant.trials if t["within"] and "task_loss" in t)
    assert "agreement" in report.summary()
    with pytest.raises(BadInput, match="needs a task metric"):
        compress(model, _feeds(10), method="quant", max_loss=0.02, progress=False)


def test_an_unreachable_budget_writes_nothing_and_says_so(tmp_path, capsys):
    from symshrink.cli import main  # noqa: PLC0415
    from tests.conftest import mlp_model  # noqa: PLC0415

    path, calib, out = tmp_path / "m.onnx", tmp_path / "calib.npz", tmp_path / "o.onnx"
    onnx.save(mlp_model(hidden=256, inputs=64, outputs=32, seed=2), path)
    np.savez(calib, x=np.random.default_rng(8).standard_normal((320, 64)).astype(np.float32))
    code = main(["compress", str(path), "-o", str(out), "--calib", str(calib), "--min-cosine", "0.99999999", "-q"])
    assert code == 1 and not out.exists()
    assert "no coded plan within the held-out cosine 0.99999999" in capsys.readouterr().err


def test_a_smaller_one_setting_plan_that_passes_wins_over_the_bisections():
    from symshrink.passes.protocol import Offer, Site  # noqa: PLC0415
    from symshrink.rules import allocation_rule, uniform_plans  # noqa: PLC0415

    def options(site: str, error4: float) -> list[Candidate]:
        return [Candidate(site, "uint4", "4-bit", 40, known(error4), known(None)),
                Candidate(site, "uint2", "2-bit", 20, known(0.5), known(None)),
                Candidate(site, "fp32", "fp32", 100, known(0.0), known(None))]

    candidates = {"a": options("a", 0.1), "b": options("b", 0.3)}
    offer = Offer("quant", [Site(s, "weight", (10, 10), 100) for s in candidates], candidates, lambda chosen: None)
    assert [sorted(c.method for c in plan.values()) for plan in uniform_plans(offer)] == [["uint2"] * 2, ["uint4"] * 2]

    def within(plan) -> bool:  # measured: mixed plans fail, as errors that do not add as predicted would make them
        return len({c.method for c in plan.values()}) == 1 or all(c.method == "fp32" for c in plan.values())

    chosen, reasons = allocation_rule(offer, within, "a test budget")
    assert {c.method for c in chosen.values()} == {"uint2"} and "one setting" in reasons["a"]
