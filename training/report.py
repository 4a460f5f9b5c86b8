"""report.md and pareto.png for a training run.

report.md: the width x depth table of the dev metric like Table 1 of Hou et al. (2020), the
teacher row, DynaBERT_w at full depth, then the baselines found in ``RUN/baselines/*/results.json``
(``dynabert train --ablation separate|vanilla --out RUN/baselines/NAME``).
pareto.png: metric against FLOPs (seq 128) and against measured CPU latency (batch 1).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _lookup(entries: list[dict[str, Any]] | None, w: float, d: float) -> float | None:
    for e in entries or []:
        if abs(e["width"] - w) < 1e-9 and abs(e["depth"] - d) < 1e-9:
            return e["value"]
    return None


def _grid_table(entries: list[dict[str, Any]], widths: list[float], depths: list[float]) -> list[str]:
    lines = [
        "| width \\ depth | " + " | ".join(f"{d}x" for d in depths) + " |",
        "|---|" + "---|" * len(depths),
    ]
    for w in widths:
        lines.append(f"| {w}x | " + " | ".join(_pct(_lookup(entries, w, d)) for d in depths) + " |")
    return lines


def load_results(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The run's results.json and its baselines' (by folder name)."""
    run_dir = Path(run_dir)
    main = json.loads((run_dir / RESULTS_FILE).read_text())
    baselines = {}
    for f in sorted((run_dir / "baselines").glob(f"*/{RESULTS_FILE}")):
        baselines[f.parent.name] = json.loads(f.read_text())
    return main, baselines


def render_markdown(main: dict[str, Any], baselines: dict[str, dict[str, Any]]) -> str:
    metric = main["metric"]
    subs = main.get("subnetworks") or []
    widths = sorted({e["width"] for e in subs} or {1.0, 0.75, 0.5, 0.25}, reverse=True)
    depths = sorted({e["depth"] for e in subs} or {1.0, 0.75, 0.5}, reverse=True)
    t = main["teacher"]
    out = [
        f"# DynaBERT on {main['task']} ({main['kind']}, recipe `{main['recipe']}`)",
        "",
        f"Backbone `{main['backbone']}`, seed {main['seed']}, {main['train_examples']} training examples, "
        f"dev metric `{metric}` (x100) on {main['dev_examples']} dev examples, run time {main['seconds']:.0f} s "
        f"wall / {main.get('cpu_seconds', float('nan')):.0f} s CPU on {main.get('threads', '?')} thread(s).",
        "",
    ]
    if subs:
        avg = main["average"]
        smallest = _lookup(subs, min(widths), min(depths))
        out += [
            "## Dev metric of every sub-network (rows: width multiplier, columns: depth multiplier)",
            "",
            *_grid_table(subs, widths, depths),
            "",
            f"- teacher (full fine-tuned backbone): **{_pct(t['value'])}**",
            f"- average over the {len(subs)} sub-networks: **{_pct(avg)}** "
            f"({100 * (avg - t['value']):+.2f} vs teacher)",
            f"- smallest ({min(widths)}, {min(depths)}): **{_pct(smallest)}** "
            f"({100 * ((smallest or 0) - t['value']):+.2f} vs teacher)",
        ]
        if main.get("stage4"):
            out.append(f"- stage 4 (fine-tuning on labels): `{main['stage4']}`")
        out.append("")
    if main.get("width_only"):
        name = "DynaBERT_w" if main["kind"] == "dynabert" else f"{main['kind']} (widths only)"
        out += [
            f"## {name} at full depth",
            "",
            "| width | " + " | ".join(f"{w}x" for w in widths) + " |",
            "|---|" + "---|" * len(widths),
            f"| {name} | " + " | ".join(_pct(_lookup(main["width_only"], w, 1.0)) for w in widths) + " |",
        ]
        sep = baselines.get("separate")
        if sep:
            out.append(
                "| separate networks | "
                + " | ".join(_pct(_lookup(sep["separate"], w, 1.0)) for w in widths)
                + " |"
            )
        van = baselines.get("vanilla")
        if van and van.get("width_only"):
            out.append(
                "| vanilla (widths only) | "
                + " | ".join(_pct(_lookup(van["width_only"], w, 1.0)) for w in widths)
                + " |"
            )
        out.append("")
    for name, b in baselines.items():
        out += [f"## Baseline: {name}", ""]
        if b.get("subnetworks"):
            out += [
                *_grid_table(b["subnetworks"], widths, depths),
                "",
                f"- average: {_pct(b['average'])} (DynaBERT: {_pct(main.get('average'))})",
                "",
            ]
        if b.get("separate"):
            out += [
                "| width | " + " | ".join(f"{e['width']}x" for e in b["separate"]) + " |",
                "|---|" + "---|" * len(b["separate"]),
                "| separate networks | " + " | ".join(_pct(e["value"]) for e in b["separate"]) + " |",
                "",
            ]
        out += [f"(teacher {_pct(b['teacher']['value'])}, {b['seconds']:.0f} s)", ""]
    out += [
        "## Cost",
        "",
        "| width | depth | params (M) | GFLOPs @128 | CPU latency ms (batch 1, 128 tokens) |",
        "|---|---|---|---|---|",
    ]
    for e in subs:
        lat = e.get("latency_ms_cpu")
        out.append(
            f"| {e['width']} | {e['depth']} | {e['params'] / 1e6:.1f} | {e['flops'] / 1e9:.2f} | "
            f"{'-' if lat is None else f'{lat:.1f}'} |"
        )
    out += ["", "![pareto](pareto.png)", ""]
    return "\n".join(out)


def pareto_points(main: dict[str, Any], entries: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(cost, metric x 100) of each entry, sorted by cost; ``key`` is ``flops`` (plotted in GFLOPs)
    or ``latency_ms_cpu``. A latency is a property of the shape (width, depth), not of how it was
    trained, but each run times its sub-networks when it evaluates them, on a shared machine at
    another moment: the same shape measured 31 ms in one stage and 43 ms in another. So every
    series is placed at the latency the main run's final evaluation measured for that shape (one
    sitting), and at its own measurement only for a shape the main run lacks."""
    shape_ms = {(e["width"], e["depth"]): e.get("latency_ms_cpu") for e in main.get("subnetworks") or []}
    pts = []
    for e in entries:
        if key == "latency_ms_cpu":
            cost = shape_ms.get((e["width"], e["depth"])) or e.get(key)
        else:
            cost = e[key] / 1e9 if e.get(key) else None
        if cost:
            pts.append((cost, 100 * e["value"]))
    return sorted(pts)


def plot_pareto(main: dict[str, Any], baselines: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    if main.get("subnetworks"):
        series.append(("DynaBERT", main["subnetworks"], "o"))
    if main.get("width_only") and main["kind"] == "dynabert":
        series.append(("DynaBERT_w", main["width_only"], "s"))
    for name, b in baselines.items():
        series.append((name, b.get("subnetworks") or b.get("separate") or [], "^"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "flops", "GFLOPs (seq 128)"),
        (axes[1], "latency_ms_cpu", "CPU latency, ms (batch 1)"),
    ):
        for name, entries, marker in series:
            pts = pareto_points(main, entries, key)
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    marker=marker,
                    linestyle="" if name == "DynaBERT" else "--",
                    label=name,
                )
        t = main["teacher"]
        if t.get(key):
            ax.axhline(100 * t["value"], color="grey", linestyle=":", label="teacher")
        ax.set_xlabel(label)
        ax.set_ylabel(f"dev {main['metric']} (x100)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{main['task']}: metric vs cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report.md and RUN/pareto.png from RUN/results.json (and baselines)."""
    run_dir = Path(run_dir)
    main, baselines = load_results(run_dir)
    (run_dir / "report.md").write_text(render_markdown(main, baselines))
    plot_pareto(main, baselines, run_dir / "pareto.png")
    log.info("wrote %s", run_dir / "report.md")
    return run_dir / "report.md"
