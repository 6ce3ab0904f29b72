"""Hyper-Compression (hyperfunction codes, Fan et al., arXiv 2409.00592), reproduced on the zoo's real weights.

The paper codes each pair of consecutive weights as one index into a fixed 2-D codebook (v3: a sheared
square lattice of n points and side L around the tensor's mean pair, plus K radial bands for outliers;
`symshrink.runtime.formats`, summary in shared/docs/methods.md section 4). What this script measures:

A. The paper's two published settings applied to real zoo models through `symshrink compress --method hyper`:
   "UNet" (L = 0.1, n = 225, K <= 3) and "MobileNetV3" (L = 0.8, n = 1600, K <= 4), L absolute as in the
   paper, K picked per tensor among 1..Kmax by the smallest relative L2 error. Per model: file size ratio,
   the paper-style ratio over the coded tensors only, normalised MSE of the coded tensors, held-out output
   diff, and the task metric before and after; plus each model's weight scale, since an absolute L means
   something different for every model.
B. Normalised MSE ||W - W'||^2 / ||W||^2 against bits per weight, 4..13 bits per pair, on the weight tensors
   `find_weight_tensors` picks: the v3 lattice (relative side 3, 4 or 6 RMS deviations and K in 0..3, the
   smallest error chosen per tensor and bit width), the v1 winding, round-to-nearest per tensor (codebook
   "grid") and per group of 64 weights. NMSE on a fixed random sample of 65536 weights per tensor
   (`evaluate_settings`), checked against whole tensors at 4, 5 and 6 bits per weight.

Fixed seeds throughout (the codec's sample seed 0). Report as markdown to --out, plot to --img-dir.

    .venv/bin/python tools/experiments/hyper_compression.py --out docs/hyper-compression.md   # full run
    .venv/bin/python tools/experiments/hyper_compression.py --quick                            # smoke test
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir
import onnxruntime
import scipy
from onnx_ir.passes.common import LiftConstantsToInitializersPass

# the whole library is imported up front, so that an edit to it during a run cannot mix two versions
from symshrink.modelio import load_model, model_bytes_on_disk
from symshrink.models.registry import cache_dir, get_model, get_task
from symshrink.options import options_from
from symshrink.passes.hyper.codes import MIN_ELEMENTS, find_weight_tensors
from symshrink.passes.hyper.search import DEFAULT_SIDES, HyperSetting, choose_setting, evaluate_settings, setting_grid
from symshrink.pipeline import compress
from symshrink.runtime.formats import decode_values, encode_hyper, relative_error
from symshrink.runtime.ort import make_session

ROOT = Path(__file__).resolve().parents[2]
SEED = 0
SAMPLE = 1 << 16  # weights per tensor the sweep measures on (evaluate_settings' fixed random sample)


@dataclass(frozen=True)
class PaperSetting:
    name: str  # the paper's model the setting was published for
    side: float  # L, absolute
    codes: int  # n
    max_bands: int  # K <= max_bands
    ratio: float  # the paper's compression ratio
    metric: str
    before: float
    after: float

    @property
    def drop(self) -> float:
        return (self.before - self.after) / self.before


PAPER = (PaperSetting("UNet", 0.1, 225, 3, 7.93, "Dice", 99.86, 99.71),
         PaperSetting("MobileNetV3", 0.8, 1600, 4, 5.04, "top-1", 74.41, 73.93))
PAPER_MODELS = ("mobilenetv2", "ppocr-rec", "ppocr-det", "ppocr-cls")
SWEEP_MODELS = ("mobilenetv2", "ppocr-rec", "minilm-l3", "fmnist-mlp")
BITS = tuple(range(4, 14))  # bits per pair (index width)
SIDES = (3.0, 4.0, 6.0)  # relative lattice side, RMS deviations
BANDS = (0, 1, 2, 3)
GROUP = 64
GRID_SIDES = DEFAULT_SIDES["grid"]  # the grid's own candidates: its range (None) and clipped spans in RMS deviations
CODECS = {  # name -> (base setting, sides tried (None: the range), plot label)
    "lattice": (HyperSetting("lattice"), SIDES, "HC v3 lattice (best side/K)"),
    "winding": (HyperSetting("winding"), (None,), "HC v1 winding"),
    "rtn": (HyperSetting("grid"), (None,), "RTN per tensor (min-max)"),
    "rtn-g64": (HyperSetting("grid", group=GROUP), (None,), f"RTN per group of {GROUP} (min-max)"),
    "rtn-best": (HyperSetting("grid"), GRID_SIDES, "RTN per tensor, best range"),
}
CHECK_BPW = (4, 5, 6)  # whole-tensor check at these bits per weight


def check_bits(codec: str) -> tuple[int, ...]:
    """Index widths that land on CHECK_BPW: b / 2 bits per weight, plus 1.5 for the per-group grid (3 float32 per
    group of 64: centre per coordinate and span)."""
    extra = 3 if codec == "rtn-g64" else 0
    return tuple(2 * t - extra for t in CHECK_BPW)


# ---------------------------------------------------------------------------------------------------------------------
# Models and weights


def model_path(name: str) -> Path:
    return get_model(name).materialise(cache_dir())


def weight_tensors(path: Path) -> list[tuple[str, np.ndarray]]:
    """The tensors the hyper stage codes: Constant nodes of MIN_ELEMENTS or more lifted to initializers first (as
    `pipeline._hyper_stage` does; PP-OCR's classifier keeps its weights in Constants), then `find_weight_tensors`."""
    model, _ = load_model(path)
    LiftConstantsToInitializersPass(size_limit=MIN_ELEMENTS)(model)
    chosen, _ = find_weight_tensors(model)
    return [(v.name, np.asarray(v.const_value.numpy(), np.float32)) for v in chosen]


def scale_row(name: str, tensors: list[tuple[str, np.ndarray]]) -> dict:
    """Weight scale of a model's coded tensors, and how an absolute side L compares with it."""
    row = {"model": name, "tensors": len(tensors), "weights": sum(w.size for _, w in tensors)}
    if not tensors:
        return row
    sizes = np.array([w.size for _, w in tensors], float)
    row["rms"] = math.sqrt(sum(float(np.sum(w.astype(np.float64) ** 2)) for _, w in tensors) / sizes.sum())
    devs, inside = [], {s.side: [] for s in PAPER}
    for _, w in tensors:
        pairs = w.reshape(-1)[: w.size // 2 * 2].astype(np.float64).reshape(-1, 2)
        off = pairs - pairs.mean(axis=0)
        devs.append(math.sqrt(float(np.mean(off**2))))
        for side in inside:
            inside[side].append(float(np.mean(np.abs(off).max(axis=1) <= side / 2)))
    devs = np.array(devs)
    row.update(dev_min=devs.min(), dev_med=float(np.median(devs)), dev_max=devs.max())
    for side, share in inside.items():
        row[f"inside_{side:g}"] = float(np.dot(sizes, share) / sizes.sum())
        row[f"side_{side:g}"] = float(np.median(side / np.maximum(devs, 1e-30)))
    return row


# ---------------------------------------------------------------------------------------------------------------------
# A. The paper's settings through the pipeline


def paper_run(name: str, setting: PaperSetting, work: Path, baseline: dict) -> dict:
    entry = get_model(name)
    task = get_task(entry.task)
    src = model_path(name)
    if name not in baseline:
        baseline[name] = task.evaluate(make_session(src))
    out = work / f"{name}-{setting.name}.onnx"
    options = options_from(method="hyper", codes=(setting.codes,), bands=tuple(range(1, setting.max_bands + 1)),
                           side=setting.side, tensor_error=None, progress=False, seed=SEED)
    start = time.perf_counter()
    report = compress(name, out, options, force=True)  # a zoo name brings its default calibration data
    seconds = time.perf_counter() - start
    coded = report.hyper.coded()
    sizes = np.array([math.prod(t.shape) for t in coded], float)
    bpw = np.array([t.bits_per_weight for t in coded], float)
    err = np.array([t.relative_error for t in coded], float)
    bands = [int(m.group(1)) if (m := re.search(r"-K(\d+)-", t.setting)) else 0 for t in coded]
    after = task.evaluate(make_session(out))
    row = {"model": name, "setting": setting.name, "task": task.name, "before": baseline[name], "after": after,
           "bytes_before": report.bytes_before, "bytes_after": model_bytes_on_disk(out), "coded": len(coded),
           "floats": len(report.hyper.tensors), "seconds": seconds, "holdout": report.holdout_feeds,
           "rel_l2": max(d.rel_l2 for d in report.diffs), "cosine": min(d.cosine for d in report.diffs),
           "table_bytes": report.hyper.table_bytes, "bands": {k: float(sizes[np.array(bands) == k].sum()) for k in set(bands)}}
    if coded:
        coded_bits = float(np.dot(sizes, bpw))
        row.update(coded_weights=float(sizes.sum()), bpw=coded_bits / sizes.sum(), paper_ratio=32 * sizes.sum() / coded_bits,
                   paper_ratio_tables=32 * sizes.sum() / (coded_bits + 8 * report.hyper.table_bytes),
                   nmse=float(np.dot(sizes, err**2) / sizes.sum()), worst=float(np.max(err**2)),
                   worst_name=coded[int(np.argmax(err))].name)
    row["drop"] = (row["before"] - after) / row["before"] if task.higher_is_better else (after - row["before"]) / row["before"]
    return row


# ---------------------------------------------------------------------------------------------------------------------
# B. NMSE against bits per weight


def sweep_tensor(job: tuple[str, str, np.ndarray, Sequence[int], bool]) -> list[dict]:
    """Every codec at every index width on one tensor: NMSE on the fixed sample, bits per weight of the whole
    tensor; at the check widths also NMSE and bits of the whole tensor coded."""
    model, name, weight, bits_list, check = job
    rows = []
    for bits in bits_list:
        for codec, (base, sides, _) in CODECS.items():
            candidates = setting_grid(base, bits=[bits], bands=BANDS, sides=sides)
            setting, err, bpw = choose_setting(evaluate_settings(weight, candidates, SAMPLE, SEED), None)
            row = {"model": model, "tensor": name, "size": weight.size, "bits": bits, "codec": codec, "setting": setting,
                   "nmse": err**2, "bpw": bpw}
            if check and bits in check_bits(codec):
                code = encode_hyper(weight, setting)
                row.update(nmse_full=relative_error(weight, decode_values(code)) ** 2, bpw_full=code.bits_per_weight())
            rows.append(row)
    return rows


def sample_choice_check(job: tuple[str, str, np.ndarray, int]) -> dict:
    """Every lattice candidate at one index width on one tensor, on the sample and on the whole tensor: whether the
    choice made on the sample (as `plan_tensors` makes it) is the whole tensor's best."""
    model, name, weight, bits = job
    flat = np.asarray(weight, np.float64).reshape(-1)
    dev = np.abs(flat - flat.mean()) / max(flat.std(), 1e-30)
    rows = []
    for setting, err, _ in evaluate_settings(weight, setting_grid(CODECS["lattice"][0], bits=[bits], bands=BANDS, sides=SIDES),
                                             SAMPLE, SEED):
        code = encode_hyper(weight, setting)
        rows.append({"setting": setting.label(), "sample": err**2, "full": relative_error(weight, decode_values(code)) ** 2,
                     "bpw": code.bits_per_weight()})
    return {"model": model, "tensor": name, "shape": weight.shape, "bits": bits, "rows": rows, "max_sd": float(dev.max()),
            "sd_9999": float(np.quantile(dev, 0.9999)), "sample_max_sd": float(dev[sample_index(flat.size)].max())}


def sample_index(size: int) -> np.ndarray:
    """Positions of the sample `evaluate_settings` draws from a tensor of `size` weights (per-tensor settings)."""
    if size <= SAMPLE:
        return np.arange(size)
    return np.sort(np.random.default_rng(SEED).choice(size, SAMPLE, replace=False))


def choice_check_text(check: dict) -> list[str]:
    rows = check["rows"]
    picked = min(rows, key=lambda r: (r["sample"], r["bpw"]))
    best = min(rows, key=lambda r: r["full"])
    out = [f"Tensor `{check['tensor']}` of {check['model']} ({'x'.join(map(str, check['shape']))}, the largest in the sweep), "
           f"{check['bits']} bits per pair: its farthest weight is {check['max_sd']:.1f} standard deviations from the mean "
           f"(99.99th percentile {check['sd_9999']:.1f}; the sample's farthest {check['sample_max_sd']:.1f}).", "",
           "| lattice setting | NMSE on the sample | NMSE of the whole tensor | bits/w |", "|---|---|---|---|"]
    for r in rows:
        mark = (" (chosen on the sample)" if r is picked else "") + (" (best on the whole tensor)" if r is best else "")
        out.append(f"| {r['setting']}{mark} | {fmt(r['sample'])} | {fmt(r['full'])} | {r['bpw']:.2f} |")
    if picked is best:
        return [*out, "", "Here the choice on the sample is also the whole tensor's best candidate."]
    out += ["", f"The choice on the sample ({picked['setting']}) has whole-tensor NMSE {fmt(picked['full'])}, "
            f"{picked['full'] / best['full']:.1f}x the best candidate's ({best['setting']}, {fmt(best['full'])}). "
            "With bands, the outer ring radius is the farthest pair's, so a tensor with rare far outliers gets much wider "
            "rings than its sample suggests. `plan_tensors` chooses on the same sample (`evaluate_settings`), so "
            "`compress --method hyper` makes the same choice on such a tensor."]
    return out


def table_bits(settings: set[HyperSetting]) -> int:
    """Bits of the shared codebook tables (one per codebook, n and dims) the settings need."""
    keys = {s.table_key(): s for s in settings}
    return sum(32 * s.offsets().size for s in keys.values())


def aggregate(rows: list[dict]) -> dict[tuple[str, str, int], dict]:
    """Size-weighted NMSE and bits per weight per (model, codec, bits)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["codec"], r["bits"])].append(r)
    out = {}
    for key, rs in groups.items():
        size = np.array([r["size"] for r in rs], float)
        total = size.sum()
        agg = {"nmse": float(np.dot(size, [r["nmse"] for r in rs]) / total),
               "bpw": float(np.dot(size, [r["bpw"] for r in rs]) / total),
               "tables": table_bits({r["setting"] for r in rs}) / total, "weights": total}
        if all("nmse_full" in r for r in rs):
            agg["nmse_full"] = float(np.dot(size, [r["nmse_full"] for r in rs]) / total)
            agg["bpw_full"] = float(np.dot(size, [r["bpw_full"] for r in rs]) / total)
        out[key] = agg
    return out


def at_bpw(agg: dict, model: str, codec: str, bpw: float, bits: Sequence[int]) -> float | None:
    """Sample NMSE at `bpw`, log-linear between the two nearest measured widths; None outside them."""
    pts = sorted((agg[(model, codec, b)]["bpw"], agg[(model, codec, b)]["nmse"]) for b in bits if (model, codec, b) in agg)
    xs = [p[0] for p in pts]
    if not pts or bpw < xs[0] - 1e-9 or bpw > xs[-1] + 1e-9:
        return None
    return float(np.exp(np.interp(bpw, xs, np.log([p[1] for p in pts]))))


# ---------------------------------------------------------------------------------------------------------------------
# Report


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}e}"


def machine_lines(argv: list[str]) -> list[str]:
    try:
        import matplotlib  # noqa: PLC0415

        mpl = matplotlib.__version__
    except ImportError:
        mpl = "absent"
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else float("nan")

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.rstrip()
        except (OSError, subprocess.CalledProcessError):
            return "?"

    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line.strip()]
    return [f"Machine: {os.cpu_count()}-core {cpu}, {ram:.0f} GB RAM, onnxruntime providers "
            f"{', '.join(onnxruntime.get_available_providers())} (CPU run, no GPU used).",
            f"Command: `.venv/bin/python tools/experiments/hyper_compression.py {' '.join(argv)}`.",
            f"Commit: {git('rev-parse', '--short', 'HEAD')}"
            + (f" plus uncommitted changes to {', '.join(sorted(dirty))} when the run started (the library modules are "
               "imported once, at the start)" if dirty else "") + ".",
            f"Versions: Python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
            f"onnx {onnx.__version__}, onnx-ir {onnx_ir.__version__}, onnxruntime {onnxruntime.__version__}, matplotlib {mpl}."]


def scale_table(rows: list[dict]) -> str:
    out = ["| model | coded tensors | weights | weight RMS | per-tensor RMS dev. min / median / max | L=0.1 in RMS dev. (median) "
           "| pairs inside L=0.1 square | L=0.8 in RMS dev. (median) | pairs inside L=0.8 square |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["tensors"]:
            out.append(f"| {r['model']} | 0 | 0 | - | - | - | - | - | - |")
            continue
        out.append(f"| {r['model']} | {r['tensors']} | {r['weights']:,} | {r['rms']:.4f} | "
                   f"{r['dev_min']:.4f} / {r['dev_med']:.4f} / {r['dev_max']:.4f} | "
                   f"{r['side_0.1']:.2f} | {r['inside_0.1']:.1%} | {r['side_0.8']:.1f} | {r['inside_0.8']:.1%} |")
    return "\n".join(out)


def paper_table(rows: list[dict]) -> str:
    out = ["| setting | model | coded / float tensors | coded bits/w | paper-style ratio (coded only; + tables) "
           "| file fp32 -> HC | file ratio | NMSE coded (worst tensor) | held-out rel. L2 (cos; feeds) | task | before | after "
           "| rel. drop "
           "| K chosen (share of coded weights) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["coded"]:
            ratio = f"{r['paper_ratio']:.2f}x; {r['paper_ratio_tables']:.2f}x"
            bands = ", ".join(f"K{k} {v / r['coded_weights']:.0%}" for k, v in sorted(r["bands"].items()))
            bits, nmse = f"{r['bpw']:.2f}", f"{fmt(r['nmse'])} ({fmt(r['worst'])})"
        else:
            ratio = bands = bits = nmse = "-"
        out.append(f"| {r['setting']} | {r['model']} | {r['coded']} / {r['floats']} | {bits} | {ratio} | "
                   f"{r['bytes_before'] / 1e6:.2f} -> {r['bytes_after'] / 1e6:.2f} MB | "
                   f"{r['bytes_before'] / r['bytes_after']:.2f}x | {nmse} | "
                   f"{r['rel_l2']:.3f} ({r['cosine']:.4f}; {r['holdout']}) | {r['task']} | {r['before']:.4f} | "
                   f"{r['after']:.4f} | {r['drop']:+.2%} | {bands} |")
    for p in PAPER:
        bits = 32 / p.ratio
        out.append(f"| {p.name} (paper) | {p.name} | - | {bits:.2f} (32 / ratio) | {p.ratio:.2f}x | - | - | - | - | {p.metric} | "
                   f"{p.before:.2f} | {p.after:.2f} | {p.drop:+.2%} | K <= {p.max_bands} |")
    return "\n".join(out)


def sweep_table(agg: dict, model: str, bits: Sequence[int]) -> str:
    head = " | ".join(f"{label}: NMSE (bits/w)" for *_, label in CODECS.values())
    out = [f"| bits per pair | {head} |", "|---" * (len(CODECS) + 1) + "|"]
    for b in bits:
        cells = [f"{fmt(a['nmse'])} ({a['bpw']:.2f})" if (a := agg.get((model, c, b))) else "-" for c in CODECS]
        out.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def check_table(agg: dict, models: Sequence[str]) -> str:
    heads = " | ".join(f"{label}: whole-tensor NMSE (bits/w; sample NMSE)" for *_, label in CODECS.values())
    out = [f"| model | bits/w target | {heads} |", "|---|---" + "|---" * len(CODECS) + "|"]
    for model in models:
        for i, target in enumerate(CHECK_BPW):
            cells = []
            for c in CODECS:
                a = agg.get((model, c, check_bits(c)[i]))
                cells.append(f"{fmt(a['nmse_full'])} ({a['bpw_full']:.2f}; {fmt(a['nmse'])})" if a and "nmse_full" in a else "-")
            out.append(f"| {model} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def choice_table(rows: list[dict], bits: Sequence[int]) -> str:
    """Which lattice side and K the sweep chose, as shares of the weights, per index width."""
    out = ["| bits per pair | n (K=0 / 1 / 2 / 3) | chosen K: share of weights | chosen side: share of weights |",
           "|---|---|---|---|"]
    for b in bits:
        rs = [r for r in rows if r["codec"] == "lattice" and r["bits"] == b]
        if not rs:
            continue
        total = sum(r["size"] for r in rs)
        by_k, by_side = defaultdict(float), defaultdict(float)
        for r in rs:
            by_k[r["setting"].bands] += r["size"] / total
            by_side[r["setting"].side] += r["size"] / total
        ns = " / ".join(str((1 << b) // (k + 1) - 1) if (1 << b) // (k + 1) - 1 >= 2 else "-" for k in BANDS)
        out.append(f"| {b} | {ns} | " + ", ".join(f"K{k} {v:.0%}" for k, v in sorted(by_k.items())) + " | "
                   + ", ".join(f"{s:g} sd {v:.0%}" for s, v in sorted(by_side.items())) + " |")
    return "\n".join(out)


def table_overhead(agg: dict, models: Sequence[str], bits: int) -> str:
    out = ["| model | weights coded | " + " | ".join(label for *_, label in CODECS.values()) + " |",
           "|---|---" + "|---" * len(CODECS) + "|"]
    for model in models:
        cells = [f"{a['tables']:.3f}" if (a := agg.get((model, c, bits))) else "-" for c in CODECS]
        weights = next((a["weights"] for c in CODECS if (a := agg.get((model, c, bits)))), 0)
        out.append(f"| {model} | {weights:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot_sweep(agg: dict, models: Sequence[str], bits: Sequence[int], path: Path) -> None:
    """NMSE (log) against bits per weight, one line per codec, one panel per model; hollow markers: whole tensors."""
    import matplotlib  # noqa: PLC0415 (only the plot needs it; the test install has no matplotlib)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cols = min(len(models), 2)
    rows = -(-len(models) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.4 * rows), squeeze=False)
    for ax, model in zip(axes.flat, models):
        for i, (codec, (*_, label)) in enumerate(CODECS.items()):
            pts = sorted((a["bpw"], a["nmse"]) for b in bits if (a := agg.get((model, codec, b))))
            if not pts:
                continue
            ax.plot(*zip(*pts), marker="o", ms=3.5, lw=1.4, color=f"C{i}", label=label)
            full = sorted((a["bpw_full"], a["nmse_full"]) for b in bits if (a := agg.get((model, codec, b))) and "nmse_full" in a)
            if full:
                ax.plot(*zip(*full), ls="none", marker="o", ms=8, mfc="none", color=f"C{i}")
        weights = next((a["weights"] for c in CODECS if (a := agg.get((model, c, bits[0])))), 0)
        ax.set(yscale="log", title=f"{model} ({weights / 1e6:.2f} M coded weights)",
               xlabel="bits per weight (side info included)", ylabel="NMSE ||W-W'||^2 / ||W||^2 (size-weighted)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, title="dots: 65536-weight sample; rings: whole tensors", title_fontsize=7)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def conclusion(agg: dict, models: Sequence[str], bits: Sequence[int]) -> list[str]:
    lines = []
    idx = CHECK_BPW.index(5) if 5 in CHECK_BPW else None
    for model in models:
        if idx is None:
            break
        full = {c: agg.get((model, c, check_bits(c)[idx])) for c in CODECS}
        if not all(a and "nmse_full" in a for a in full.values()):
            continue
        lat, win, rtn, g64, clip = (full[c]["nmse_full"] for c in ("lattice", "winding", "rtn", "rtn-g64", "rtn-best"))
        lines.append(f"* **{model}**, whole tensors at about 5 bits per weight: lattice NMSE {fmt(lat)} "
                     f"({full['lattice']['bpw_full']:.2f} bits/w) vs per-tensor RTN {fmt(rtn)} ({full['rtn']['bpw_full']:.2f}) "
                     f"and per-group RTN {fmt(g64)} ({full['rtn-g64']['bpw_full']:.2f}); best-range per-tensor RTN {fmt(clip)} "
                     f"({full['rtn-best']['bpw_full']:.2f}); v1 winding {fmt(win)}. Lattice / per-tensor RTN = {lat / rtn:.2f}, "
                     f"lattice / per-group RTN = {lat / g64:.2f}, lattice / best-range RTN = {lat / clip:.2f}, "
                     f"winding / lattice = {win / lat:.1f}.")
    for model in models:
        cells = []
        for target in (3.0, 4.0, 5.0, 6.0):
            lat, rtn, g64, clip = (at_bpw(agg, model, c, target, bits) for c in ("lattice", "rtn", "rtn-g64", "rtn-best"))
            if lat is None or rtn is None:
                continue
            cell = f"{target:g} bits/w: lattice / RTN per tensor {lat / rtn:.2f}"
            if g64 is not None:
                cell += f", / RTN g64 {lat / g64:.2f}"
            if clip is not None:
                cell += f", / best-range RTN {lat / clip:.2f}"
            cells.append(cell)
        if cells:
            lines.append(f"* {model}, sample sweep (log-linear between measured widths): " + "; ".join(cells) + ".")
    return lines


def write_report(path: Path, header: list[str], scales: list[dict], paper_rows: list[dict], rows: list[dict], agg: dict,
                 models: Sequence[str], bits: Sequence[int], img: Path, timings: dict, quick: bool, check: dict) -> None:
    rel_img = os.path.relpath(img, path.parent)
    top = max(bits)
    text = [
        "# Hyper-Compression: hyperfunction codes, reproduced on the zoo",
        "",
        "Paper: F. Fan et al., *Hyper-Compression: Model Compression via Hyperfunction* (arXiv 2409.00592; code:",
        "github.com/Juntongkuki/Hyper-Compression). Summary of the method in `shared/docs/methods.md`, section 4; the codec is",
        "`symshrink.runtime.formats` (the setting's choice: `symshrink.passes.hyper.search`), the pass",
        "`symshrink.passes.hyper.codes` (`symshrink compress --method hyper`).",
        "",
        "## What the paper claims",
        "",
        "Each tensor is flattened into consecutive pairs of weights; each pair is stored as one integer index into a fixed",
        "2-D codebook and decoded by table lookup, with no retraining and no data. In the current official code (v3) the",
        "codebook is a sheared square lattice of `n` points (a rational winding of slope `m = ceil(sqrt(n))`) on a square of",
        "side `L` around the tensor's mean pair, plus `K` radial bands for the pairs outside the square (shrunk towards the",
        "centre, coded, expanded back); the index `j + (n + 1) k` costs `ceil(log2((n + 1)(K + 1)))` bits per pair. The paper",
        f"reports MobileNetV3 at {PAPER[1].ratio}x with top-1 {PAPER[1].before} -> {PAPER[1].after} (L = {PAPER[1].side}, n = "
        f"{PAPER[1].codes}, K <= {PAPER[1].max_bands}) and a UNet at {PAPER[0].ratio}x with Dice {PAPER[0].before} -> "
        f"{PAPER[0].after} (L = {PAPER[0].side}, n = {PAPER[0].codes}, K <= {PAPER[0].max_bands}); K is chosen per tensor.",
        "",
        "## What was run",
        "",
        "Script: `tools/experiments/hyper_compression.py` (every number below is its output; fixed seeds)."
        + (" **Quick smoke configuration: not the full run.**" if quick else ""),
        "",
        *[f"* {line}" for line in header],
        f"* Wall time: {timings['total']:.0f} s in all (B, the NMSE sweep in {timings['workers']} worker processes: "
        f"{timings['sweep']:.0f} s; A, compress and evaluate: {timings['paper']:.0f} s); load average over the run's last 15 "
        f"minutes {timings['load']:.1f} on {os.cpu_count()} cores, of which this run's own processes are at most "
        f"{timings['workers']} (other jobs shared the machine when it is higher).",
        "",
        "## A. The paper's settings on zoo models",
        "",
        "Each model is compressed by `symshrink.pipeline.compress(name, out, options_from(method=\"hyper\", codes=(n,), "
        "bands=(1, .., Kmax), side=L, tensor_error=None))`: L absolute (`HyperSetting(codebook=\"lattice\", codes=n, bands=K, "
        "side=L, absolute_side=True)`), K chosen per tensor among 1..Kmax by the smallest relative L2 error on a fixed sample of "
        "the tensor (`choose_setting` with no target; ties go to fewer bits). The paper's driver picks K by the smallest mean "
        "absolute error instead. Tensors under 4096 weights, biases and norms stay float32, as the pass does for every setting.",
        "The held-out diff is the pipeline's (zoo default calibration data, held-out split); the task metric runs the saved "
        "file through onnxruntime (`get_task(entry.task).evaluate(make_session(path))`, as `symshrink eval` does).",
        "",
        "Weight scale of the coded tensors (RMS deviation: of each pair from the tensor's mean pair, as the relative lattice "
        "measures it; 'pairs inside': share of pairs with `|p - c|_inf <= L/2`, size-weighted):",
        "",
        scale_table(scales),
        "",
        paper_table(paper_rows),
        "",
        "* *Paper-style ratio*: float32 bits of the coded tensors over their index bits plus side information (band "
        "scales, centre, span), then also counting the shared codebook tables; it leaves out every tensor kept in float32. "
        "*File ratio*: bytes on disk of the fp32 .onnx over the compressed .onnx (`model_bytes_on_disk`). *NMSE coded*: "
        "size-weighted mean over the coded tensors of `||W - W'||^2 / ||W||^2` (whole tensors). *Rel. drop*: "
        "`(before - after) / before`.",
        "* ppocr-cls keeps its weights in `Constant` nodes; the hyper stage lifts those of 4096 or more elements to "
        "initializers before it codes (`LiftConstantsToInitializersPass(size_limit=MIN_ELEMENTS)`), and the weight-scale "
        "table above does the same.",
        *absolute_side_notes(scales, paper_rows),
        "* **The paper's ratios from the index widths.** At `ceil(log2((n + 1)(K + 1)))` bits per pair, n = 225 costs 9 "
        "bits (K = 1: 4.5 bits per weight, 7.1x) or 10 bits (K = 2, 3: 5 bits per weight, 6.4x), and n = 1600 costs 12 "
        "bits (K = 1: 6 bits per weight, 5.3x) or 13 bits (K = 2..4: 6.5 bits per weight, 4.9x); the codec drops to the "
        "width without bands when no pair of a tensor lies outside the square. The paper's 7.93x (4.04 bits per weight) "
        "is below what n = 225 with any band allows; how the paper counts its ratio was not established here.",
        "",
        "## B. Normalised MSE against bits per weight",
        "",
        f"Tensors: those `find_weight_tensors` picks in {', '.join(models)} (float32 weights read as weights, at least 4096 "
        f"of them). For each index width b = {min(bits)}..{top} bits per pair and each tensor, candidates from `setting_grid`:",
        "",
        f"* **HC v3 lattice**: side {', '.join(f'{s:g}' for s in SIDES)} RMS deviations (relative side) x K in "
        f"{', '.join(map(str, BANDS))}, n = 2^b / (K + 1) - 1; per tensor and width the candidate with the smallest error "
        "(`choose_setting(evaluate_settings(...), None)`), so the lattice line is the best of 12 per point.",
        "* **HC v1 winding**: n = 2^b codewords `frac(t a)`, scaled to the tensor's range (the paper's first version).",
        "* **RTN per tensor (min-max)**: codebook `grid`, M = floor(2^(b/2)) levels per weight over the tensor's range "
        "(M^2 <= 2^b codewords, so odd b wastes part of the index).",
        f"* **RTN per group of {GROUP} (min-max)**: the same grid with a centre and span per {GROUP} weights. The codec "
        "stores the centre once per coordinate, so a group costs three float32: 1.5 bits per weight of side information (a usual "
        "fp16 scale + zero point would be 0.5).",
        "* **RTN per tensor, best range**: the same `grid` codebook with each of the grid's default spans "
        f"(`DEFAULT_SIDES['grid']` = {', '.join('range' if x is None else f'{x:g} sd' for x in GRID_SIDES)}: the range, or s "
        "RMS deviations around the tensor's mean pair with the weights beyond clipped to the end levels), the best on the "
        "sample. It gives RTN the same kind of per-tensor range search the lattice gets from its side and bands.",
        "",
        "NMSE: size-weighted mean over a model's tensors of `||W - W'||^2 / ||W||^2`, each measured on a **fixed random sample "
        f"of {SAMPLE} weights per tensor** (smaller tensors whole; per-group RTN samples whole groups), the sample paired in "
        "order (`evaluate_settings`, seed 0). Bits per weight: index bits plus band scales, centres and spans of the whole "
        "tensor (the `HyperCode` accounting), size-weighted; the shared codebook tables are not in it (table below). A "
        "sample rarely holds a tensor's extreme weights, which set the scale of the range codecs (winding, min-max RTN) "
        "and the lattice's outer band radius, so the sample can flatter all of them; the rings in the plot and the check "
        "table below code the whole tensors at 4, 5 and 6 bits per weight (lattice and best-range RTN at the setting chosen "
        "on the sample).",
        "",
        f"![NMSE vs bits per weight]({rel_img})",
        "",
    ]
    for model in models:
        text += [f"### {model}", "", sweep_table(agg, model, bits), ""]
    text += [
        "### Lattice settings chosen (all models, shares of the coded weights)",
        "",
        choice_table(rows, bits),
        "",
        "### Whole tensors against the sample",
        "",
        check_table(agg, models),
        "",
        "### Choosing the lattice setting on a sample",
        "",
        *choice_check_text(check),
        "",
        f"### Shared codebook tables at {top} bits per pair, in bits per coded weight (not in the numbers above)",
        "",
        table_overhead(agg, models, top),
        "",
        "## Where HC stands against RTN at equal bits",
        "",
        *conclusion(agg, models, bits),
        "",
        *closing_notes(agg, models, bits),
        "",
        "## Not reproduced / deviations",
        "",
        "* No UNet and no MobileNetV3: the paper's settings were applied to the zoo's models (MobileNetV2 at 64 px with "
        "a Fashion-MNIST linear probe, PP-OCR recogniser, detector and orientation classifier); the task metrics are "
        "theirs, not top-1 on ImageNet or Dice.",
        "* K is chosen by relative L2 error, not mean absolute error; the paper's per-layer exclusions (if any) are not "
        "replicated: the pass codes every weight tensor of 4096 or more weights.",
        "* Bits are counted as the codec stores them: `ceil(log2((n + 1)(K + 1)))` per pair, plus float32 side "
        "information; the paper's ratios may count differently (they are given as published).",
        "* Section B's sweep measures on a 65536-weight sample per tensor; the whole-tensor check covers 4, 5 and 6 bits "
        "per weight only.",
    ]
    path.write_text("\n".join(text) + "\n")


def absolute_side_notes(scales: list[dict], paper_rows: list[dict]) -> list[str]:
    """The absolute-L problem, in the measured numbers."""
    have = [s for s in scales if s["tensors"]]
    if not have:
        return []
    lines = ["* **Absolute L.** The paper's L is absolute, so it is tuned to its models' weight scale. Here the weight RMS "
             "ranges from " + ", ".join(f"{s['rms']:.3f} ({s['model']})" for s in have) + "; L = 0.1 is a median of "
             + ", ".join(f"{s['side_0.1']:.2f}" for s in have) + " RMS deviations of the tensors, L = 0.8 a median of "
             + ", ".join(f"{s['side_0.8']:.1f}" for s in have) + ". Inside one model the per-tensor RMS deviation spans "
             + ", ".join(f"{s['dev_max'] / s['dev_min']:.0f}x ({s['model']})" for s in have) + ", so one absolute L is too "
             "small for some tensors (most pairs fall in the outlier bands) and too large for others (the lattice step is "
             "coarse against the weights)."]
    for r in paper_rows:
        if r["coded"] and r["drop"] > 0.05:
            lines.append(f"* {r['setting']} setting on {r['model']}: {r['task']} {r['before']:.4f} -> {r['after']:.4f} "
                         f"({r['drop']:+.1%}), held-out relative L2 {r['rel_l2']:.3f}; the coded tensors' NMSE is "
                         f"{fmt(r['nmse'])}, the worst tensor's {fmt(r['worst'])} (`{r['worst_name']}`).")
    if any(r["task"] == "fmnist-probe" for r in paper_rows):
        lines.append("* `fmnist-probe` (mobilenetv2) refits its logistic regression on the evaluated model's own features "
                     "(5000 train images, accuracy on 2000 test images: one standard error is about 0.8 points), so it "
                     "measures whether the features stay useful, not whether they match the original's; the held-out "
                     "relative L2 of the features says how far they moved.")
    worst = [r for r in paper_rows if r["coded"]]
    if worst:
        w = max(worst, key=lambda r: r["nmse"])
        b = min(worst, key=lambda r: r["nmse"])
        lines.append(f"* NMSE of the coded tensors ranges from {fmt(b['nmse'])} ({b['model']}, {b['setting']} setting) to "
                     f"{fmt(w['nmse'])} ({w['model']}, {w['setting']} setting) at {b['bpw']:.2f} and {w['bpw']:.2f} bits per "
                     "weight: the same setting is not the same quality on different models.")
    return lines


def closing_notes(agg: dict, models: Sequence[str], bits: Sequence[int]) -> list[str]:
    """Summary sentences that hold for every model measured (or say which do not)."""
    lines = []
    idx = CHECK_BPW.index(5) if 5 in CHECK_BPW else None
    if idx is None:
        return lines
    measured = []
    for model in models:
        full = {c: agg.get((model, c, check_bits(c)[idx])) for c in CODECS}
        if all(a and "nmse_full" in a for a in full.values()):
            measured.append((model, {c: a["nmse_full"] for c, a in full.items()}))
    if not measured:
        return lines
    beats_rtn = [m for m, v in measured if v["lattice"] < v["rtn"]]
    beats_g64 = [m for m, v in measured if v["lattice"] < v["rtn-g64"]]
    beats_clip = [m for m, v in measured if v["lattice"] < v["rtn-best"]]
    lines.append(f"At about 5 bits per weight on whole tensors the v3 lattice has lower NMSE than per-tensor RTN on "
                 f"{len(beats_rtn)} of {len(measured)} models ({', '.join(beats_rtn) or 'none'}) and lower than per-group "
                 f"RTN (charged 1.5 bits per weight of side information) on {len(beats_g64)} of {len(measured)} "
                 f"({', '.join(beats_g64) or 'none'}); lower than per-tensor RTN with its range chosen on the "
                 f"sample on {len(beats_clip)} of {len(measured)} ({', '.join(beats_clip) or 'none'}). The v1 winding is worse "
                 f"than the lattice on {sum(v['winding'] > v['lattice'] for _, v in measured)} of {len(measured)}. "
                 "Min-max RTN spans the tensor's or group's range [min, max]; the best-range RTN row separates how "
                 "much of the lattice's lead is that range choice: min-max RTN / best-range RTN = "
                 + ", ".join(f"{v['rtn'] / v['rtn-best']:.1f} ({m})" for m, v in measured) + ", best-range RTN / lattice = "
                 + ", ".join(f"{v['rtn-best'] / v['lattice']:.2f} ({m})" for m, v in measured) + ".")
    for model in models:
        a = agg.get((model, "lattice", check_bits("lattice")[idx]))
        if a and "nmse_full" in a and a["nmse_full"] > 1.5 * a["nmse"]:
            lines += ["", f"On {model} the lattice's whole-tensor NMSE at 5 bits per weight is {a['nmse_full'] / a['nmse']:.1f}x "
                      "its sample NMSE: the sample misrepresents the whole tensors (the section 'Choosing the lattice "
                      "setting on a sample' shows what that does to the choice on the sweep's largest tensor); on the "
                      "sample the lattice / best-range RTN ratio is "
                      f"{a['nmse'] / agg[(model, 'rtn-best', check_bits('rtn-best')[idx])]['nmse']:.2f}."]
    fairer = []
    for model, _ in measured:
        g9 = agg.get((model, "rtn-g64", 9))
        lat = agg.get((model, "lattice", 10))
        if g9 and lat:
            fairer.append(f"{model} {fmt(g9['nmse'])} vs lattice {fmt(lat['nmse'])}")
    if fairer:
        lines += ["", "With a usual fp16 scale + zero point per group (0.5 instead of 1.5 bits per weight of side information, "
                  "an accounting change, not measured by the codec), per-group RTN at 5.0 bits per weight is its b = 9 point "
                  "(22 levels): sample NMSE " + "; ".join(fairer) + " (lattice at b = 10, also a sample)."]
    lines += ["", "These are weight errors only; what they do to a task depends on the model (section A shows the task "
              "metric for the paper's settings). The measured gap is what the comparison supports: no claim of a better "
              "rate-distortion trade-off than RTN is made beyond these numbers."]
    return lines


# ---------------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="markdown report (default: print only; --quick: a temp file)")
    parser.add_argument("--img-dir", type=Path, help="where the plot goes (default docs/img; --quick: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="smoke test: two small models, three widths")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes for the NMSE sweep")
    parser.add_argument("--skip-paper", action="store_true", help="skip section A (compress and evaluate)")
    args = parser.parse_args()
    start = time.perf_counter()
    header = machine_lines(sys.argv[1:])  # the commit and working tree the run starts from
    tmp = Path(tempfile.mkdtemp(prefix="hyper-compression-"))
    img_dir = args.img_dir or (tmp if args.quick else ROOT / "docs" / "img")
    img_dir.mkdir(parents=True, exist_ok=True)
    out = args.out or tmp / "hyper-compression.md"
    paper_models = ("ppocr-det", "ppocr-cls") if args.quick else PAPER_MODELS
    sweep_models = ("fmnist-mlp",) if args.quick else SWEEP_MODELS
    bits = (7, 8, 10) if args.quick else BITS  # quick: the 5 bits/w check of every codec (and 4 of three)

    # B first: numpy only, in worker processes (started before onnxruntime makes threads in this one)
    t0 = time.perf_counter()
    jobs = [(m, name, w, bits, True) for m in sweep_models for name, w in weight_tensors(model_path(m))]
    jobs.sort(key=lambda j: -j[2].size)  # largest first: the pool stays busy to the end
    rows = []
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        largest = jobs[0]
        choice = pool.submit(sample_choice_check, (largest[0], largest[1], largest[2], 10))
        for i, part in enumerate(pool.map(sweep_tensor, jobs)):
            rows += part
            print(f"sweep: {i + 1}/{len(jobs)} tensors ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        check = choice.result()
    agg = aggregate(rows)
    sweep_seconds = time.perf_counter() - t0
    img = img_dir / "hyper-compression-nmse.png"
    plot_sweep(agg, sweep_models, bits, img)

    # A: the paper's settings through the pipeline
    t0 = time.perf_counter()
    scales = [scale_row(m, weight_tensors(model_path(m))) for m in paper_models]
    paper_rows, baseline = [], {}
    if not args.skip_paper:
        for setting in PAPER:
            for m in paper_models:
                paper_rows.append(paper_run(m, setting, tmp, baseline))
                r = paper_rows[-1]
                print(f"paper {setting.name} {m}: {r['task']} {r['before']:.4f} -> {r['after']:.4f}, "
                      f"file {r['bytes_before'] / r['bytes_after']:.2f}x ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
    paper_seconds = time.perf_counter() - t0

    timings = {"load": os.getloadavg()[2], "total": time.perf_counter() - start,
               "sweep": sweep_seconds, "paper": paper_seconds, "workers": args.workers}
    write_report(out, header, scales, paper_rows, rows, agg, sweep_models, bits, img, timings, args.quick, check)
    print(out.read_text())
    print(f"report in {out}; plot {img}; wall time {timings['total']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
