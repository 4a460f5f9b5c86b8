"""Generate the Grafana dashboards under deploy/grafana/dashboards/ from Python.

The dashboards are code (grafana-foundation-sdk builders); the JSON next to them is generated and
committed so Grafana's file provisioning can load it without running Python. A test regenerates it
and requires the committed bytes to be identical, so edit this file, never the JSON.

    python deploy/grafana/generate.py           # (re)write the JSON files
    python deploy/grafana/generate.py --check   # exit 1 naming every file that is stale

Metric names and labels come from docs/CONTRACTS.md. Every PromQL expression here is evaluated
against a real Prometheus scraping the service by tests/deploy/test_prometheus_live.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, stat, table, timeseries
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"

# The data source is chosen through a variable, so the dashboards also import into a Grafana whose
# Prometheus has another uid; provisioning (provisioning/datasources/) names ours "prometheus".
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Label filter shared by every query: the model and instance template variables (multi, with All).
SEL = 'model=~"$model", instance=~"$instance"'
# the door's rejections, and requests gone before their body was in, carry model="unknown" (the
# body, which names the model, is not read)
SEL_DOOR = 'model=~"$model|unknown", instance=~"$instance"'
INST = 'instance=~"$instance"'
RATE = "$__rate_interval"


def q(expr: str, legend: str = "__auto", ref: str = "A") -> prom.Dataquery:
    """A range query (time series)."""
    return prom.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DS).range()


def q_table(expr: str, ref: str = "A") -> prom.Dataquery:
    """An instant query returned as a table (one row per series, one column per label)."""
    return prom.Dataquery().expr(expr).ref_id(ref).datasource(DS).instant().format(PromQueryFormat.TABLE)


def legend(*calcs: str) -> cb.VizLegendOptions:
    mode = common.LegendDisplayMode.TABLE if calcs else common.LegendDisplayMode.LIST
    return (
        cb.VizLegendOptions()
        .display_mode(mode)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(list(calcs))
    )


def tooltip() -> cb.VizTooltipOptions:
    return cb.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)


def thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=v, color=c) for v, c in steps])
    )


def ts(title: str, description: str, unit: str) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .legend(legend("mean", "max", "lastNotNull"))
        .tooltip(tooltip())
        .line_width(1)
        .fill_opacity(10)
        .span_nulls(False)
    )


def right_axis(unit: str) -> list[dm.DynamicConfigValue]:
    """Field overrides that draw the matched series in ``unit`` on a right-hand axis."""
    return [
        dm.DynamicConfigValue(id_val="unit", value=unit),
        dm.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
    ]


def grid(x: int, y: int, w: int, h: int) -> dm.GridPos:
    return dm.GridPos(x=x, y=y, w=w, h=h)


# --- panels ---------------------------------------------------------------------------------------


def request_rate_by_subnetwork() -> timeseries.Panel:
    return (
        ts(
            "Request rate by sub-network",
            "Requests per second routed to each width x depth sub-network, stacked: the stack's height "
            "is the total served rate, each band one sub-network (DESIGN.md section 2: widths 1.0/0.75/"
            "0.5/0.25 x depths 1.0/0.75/0.5).",
            "reqps",
        )
        .with_target(
            q(
                f"sum by (width, depth) (rate(dynabert_subnetwork_selected_total{{{SEL}}}[{RATE}]))",
                "w={{width}} d={{depth}}",
            )
        )
        .stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL))
        .fill_opacity(60)
        .min(0)
    )


def traffic_share_matrix() -> table.Panel:
    # One row per width, one column per depth, each cell the share of requests over the dashboard's
    # time range: the "heatmap" of sub-network usage, as a colour-graded matrix.
    expr = (
        f"sum by (width, depth) (increase(dynabert_subnetwork_selected_total{{{SEL}}}[$__range]))"
        f" / ignoring (width, depth) group_left"
        f" sum(increase(dynabert_subnetwork_selected_total{{{SEL}}}[$__range]))"
    )
    return (
        table.Panel()
        .title("Traffic share per width x depth")
        .description(
            "Share of requests each sub-network served over the selected time range; rows are widths, "
            "columns depths. A bright cell far from (1.0, 1.0) means budgets or load push traffic to "
            "small sub-networks."
        )
        .datasource(DS)
        .with_target(q_table(expr))
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="groupingToMatrix",
                options={
                    "rowField": "width",
                    "columnField": "depth",
                    "valueField": "Value",
                    "emptyValue": "zero",
                },
            )
        )
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="organize",
                options={"renameByName": {"width\\depth": "width \\ depth"}},
            )
        )
        .unit("percentunit")
        .decimals(1)
        .min(0)
        .max(1)
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.CONTINUOUS_BLUES))
        .override_by_field_type(
            "number",
            [dm.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-background"})],
        )
        .sort_by([cb.TableSortByFieldState().display_name("width \\ depth").desc(True)])
    )


def latency_vs_budget() -> timeseries.Panel:
    hist = f"sum by (le) (rate(dynabert_request_duration_seconds_bucket{{{SEL}}}[{RATE}]))"
    budget = f"sum by (le) (rate(dynabert_latency_budget_seconds_bucket{{{SEL}}}[{RATE}]))"
    return (
        ts(
            "Latency p50 / p95 / p99 against the budget",
            "End-to-end request latency quantiles (queue + inference + HTTP) next to the median latency "
            "budget clients asked for (X-Latency-Budget-Ms). p99 above the budget line means the policy "
            "is missing deadlines: see the attainment panel.",
            "s",
        )
        .with_target(q(f"histogram_quantile(0.50, {hist})", "p50", "A"))
        .with_target(q(f"histogram_quantile(0.95, {hist})", "p95", "B"))
        .with_target(q(f"histogram_quantile(0.99, {hist})", "p99", "C"))
        .with_target(q(f"histogram_quantile(0.50, {budget})", "median budget", "D"))
        .override_by_name(
            "median budget",
            [
                dm.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
                dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"}),
                dm.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
            ],
        )
        .min(0)
    )


def attainment() -> timeseries.Panel:
    # `rate(met="true") or rate(all) * 0` keeps a (zero) numerator when every request missed, so the
    # ratio reads 0 instead of disappearing.
    met = (
        f'rate(dynabert_latency_budget_total{{{SEL}, met="true"}}[{RATE}])'
        f" or rate(dynabert_latency_budget_total{{{SEL}}}[{RATE}]) * 0"
    )
    total = f"sum by (model) (rate(dynabert_latency_budget_total{{{SEL}}}[{RATE}]))"
    return (
        ts(
            "Budget attainment",
            "Fraction of requests that completed within their latency budget, per model. The SLO is "
            "99% (dashed threshold; alert DynaBERTBudgetAttainmentLow after 5 minutes below it).",
            "percentunit",
        )
        .with_target(q(f"sum by (model) ({met}) / {total}", "{{model}}"))
        .min(0)
        .max(1)
        .thresholds(thresholds((None, "red"), (0.99, "green")))
        .thresholds_style(cb.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED))
    )


def attainment_stat() -> stat.Panel:
    total = f"sum(increase(dynabert_latency_budget_total{{{SEL}}}[$__range]))"
    missed = f'sum(increase(dynabert_latency_budget_total{{{SEL}, met="false"}}[$__range]))'
    return (
        stat.Panel()
        .title("Attainment over range")
        .description("Share of requests within budget over the whole selected time range.")
        .datasource(DS)
        .with_target(q_table(f"1 - (({missed}) or vector(0)) / {total}"))
        .unit("percentunit")
        .decimals(2)
        .thresholds(thresholds((None, "red"), (0.99, "green")))
        .color_mode(common.BigValueColorMode.BACKGROUND)
    )


def utilisation() -> timeseries.Panel:
    return (
        ts(
            "CPU / GPU utilisation and contention",
            "CPU utilisation of the cores the service may run on (its cpuset; the host without one) and GPU utilisation, as the service samples them (0 GPU without one), "
            "the share of its CPU quota's periods in which the kernel throttled it (0 without a quota), and the "
            "contention factor the policy multiplies predicted latencies by. Read it against the width "
            "and depth panels beside it: rising load should move traffic to smaller sub-networks.",
            "percentunit",
        )
        .with_target(
            q(f"max by (instance) (dynabert_cpu_utilization_ratio{{{INST}}})", "CPU {{instance}}", "A")
        )
        .with_target(
            q(f"max by (instance) (dynabert_gpu_utilization_ratio{{{INST}}})", "GPU {{instance}}", "B")
        )
        .with_target(
            q(f"max by (instance) (dynabert_cpu_throttled_ratio{{{INST}}})", "throttled {{instance}}", "D")
        )
        .with_target(
            q(
                f"max by (model, instance) (dynabert_contention_factor{{{SEL}}})",
                "contention {{model}} {{instance}}",
                "C",
            )
        )
        .override_by_regexp("contention.*", right_axis("x"))
        .min(0)
    )


def chosen(label: str) -> timeseries.Panel:
    return (
        ts(
            f"Chosen {label}",
            f"Share of requests served at each {label} multiplier (100% stacked).",
            "percentunit",
        )
        .with_target(
            q(
                f"sum by ({label}) (rate(dynabert_subnetwork_selected_total{{{SEL}}}[{RATE}]))",
                f"{label} {{{{{label}}}}}",
            )
        )
        .stacking(cb.StackingConfig().mode(common.StackingMode.PERCENT))
        .fill_opacity(60)
        .legend(legend())
    )


def selection_reasons() -> timeseries.Panel:
    return (
        ts(
            "Selection reason",
            "Why each sub-network was chosen: budget (fits the budget), fallback (nothing fit: the "
            "fastest one served and the budget reported missed), pinned (request headers), fixed / "
            "max_accuracy (policy setting).",
            "reqps",
        )
        .with_target(
            q(
                f"sum by (reason) (rate(dynabert_subnetwork_selected_total{{{SEL}}}[{RATE}]))",
                "{{reason}}",
            )
        )
        .stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL))
        .fill_opacity(60)
        .min(0)
    )


def queue() -> timeseries.Panel:
    return (
        ts(
            "Queue depth and bound",
            "Requests waiting or running per instance, with the bound past which new requests are "
            "rejected with 503 + Retry-After (dashed), and rejections per second by reason (right "
            "axis): queue_full, deadline (DYNABERT_SHED_LATE), shutting_down, or in_flight (the door, "
            "DYNABERT_MAX_IN_FLIGHT, shown with every model: it answers before the body names one); and "
            "requests whose clients hung up first (right axis): queued ones are taken out of the queue "
            "unrun, running ones lose their answer, body ones left before sending their whole body; "
            "and connections closed for clients past a limit (right axis, all models): too slow to send "
            "their headers or body (DYNABERT_HEADER_TIMEOUT_S, DYNABERT_BODY_TIMEOUT_S), or headers too "
            "large (DYNABERT_MAX_HEADER_BYTES). Alert "
            "DynaBERTQueueNearBound fires at 80%.",
            "short",
        )
        .with_target(
            q(
                f"sum by (model, instance) (dynabert_queue_depth{{{SEL}}})",
                "depth {{model}} {{instance}}",
                "A",
            )
        )
        .with_target(
            q(
                f"max by (model, instance) (dynabert_queue_capacity{{{SEL}}})",
                "bound {{model}} {{instance}}",
                "B",
            )
        )
        .with_target(
            q(
                f"sum by (model, reason) (rate(dynabert_rejected_total{{{SEL_DOOR}}}[{RATE}]))",
                "rejected/s {{reason}} {{model}}",
                "C",
            )
        )
        .with_target(
            q(
                f"sum by (model, stage) (rate(dynabert_client_closed_total{{{SEL_DOOR}}}[{RATE}]))",
                "client closed/s {{stage}} {{model}}",
                "D",
            )
        )
        .with_target(
            q(
                f"sum by (model, stage) (rate(dynabert_deadline_exceeded_total{{{SEL}}}[{RATE}]))",
                "timed out/s {{stage}} {{model}}",
                "E",
            )
        )
        .with_target(
            q(
                f"sum by (reason) (rate(dynabert_connections_closed_total{{{INST}}}[{RATE}]))",
                "connections closed/s {{reason}}",
                "F",
            )
        )
        .override_by_regexp(
            "rejected.*|client closed.*|timed out.*|connections closed.*", right_axis("reqps")
        )
        .override_by_regexp(
            "bound.*",
            [
                dm.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
                dm.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
            ],
        )
        .min(0)
    )


def batch_and_wait() -> timeseries.Panel:
    bs = f"sum by (le) (rate(dynabert_batch_size_bucket{{{SEL}}}[{RATE}]))"
    wait = f"sum by (le) (rate(dynabert_queue_wait_seconds_bucket{{{SEL}}}[{RATE}]))"
    return (
        ts(
            "Batch size and queue wait",
            "Mean and p95 batch size the scheduler formed (left axis) and p95 time requests waited in "
            "the queue before inference (right axis). Batches of 1 at high load mean requests spread "
            "over many sub-networks; long waits with small batches mean the workers are saturated.",
            "short",
        )
        .with_target(
            q(
                f"sum(rate(dynabert_batch_size_sum{{{SEL}}}[{RATE}])) / sum(rate(dynabert_batch_size_count{{{SEL}}}[{RATE}]))",
                "mean batch",
                "A",
            )
        )
        .with_target(q(f"histogram_quantile(0.95, {bs})", "p95 batch", "B"))
        .with_target(q(f"histogram_quantile(0.95, {wait})", "p95 queue wait", "C"))
        .override_by_name("p95 queue wait", right_axis("s"))
        .min(0)
    )


def threads() -> timeseries.Panel:
    return (
        ts(
            "Forward passes by thread count",
            "Forward passes per second by the intra-op thread count each ran on. The server picks it "
            "per batch from the latency profile, which is measured at one thread and at the most it "
            "uses: small batches of small sub-networks run faster on one thread (waking the others "
            "costs more than they give), big batches on all, and while other processes keep cores "
            "busy no more threads than the cores left free.",
            "ops",
        )
        .with_target(
            q(
                f"sum by (threads) (rate(dynabert_inference_threads_total{{{SEL}}}[{RATE}]))",
                "{{threads}} thread(s)",
            )
        )
        .stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL))
        .min(0)
    )


def errors() -> timeseries.Panel:
    return (
        ts(
            "Error rate by status",
            "Non-2xx responses per second by HTTP status. 4xx are client mistakes (bad header, invalid "
            "body, unknown model); 499: the client hung up before its answer (a client timeout shorter "
            "than the queue); 503/429 are load shedding (scale out); 504: a request's announced timeout "
            "(X-Request-Timeout-Ms) passed or would have; any other 5xx is a bug "
            "(alert DynaBERTServerErrors).",
            "reqps",
        )
        .with_target(
            q(
                f'sum by (status, endpoint) (rate(dynabert_requests_total{{{SEL}, status!~"2.."}}[{RATE}]))',
                "{{status}} {{endpoint}}",
            )
        )
        .stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL))
        .fill_opacity(60)
        .min(0)
    )


def error_ratio_stat() -> stat.Panel:
    return (
        stat.Panel()
        .title("Error ratio over range")
        .description("Share of responses that were not 2xx over the selected time range.")
        .datasource(DS)
        .with_target(
            q_table(
                f'(sum(increase(dynabert_requests_total{{{SEL}, status!~"2.."}}[$__range])) or vector(0))'
                f" / sum(increase(dynabert_requests_total{{{SEL}}}[$__range]))"
            )
        )
        .unit("percentunit")
        .decimals(2)
        .thresholds(thresholds((None, "green"), (0.01, "orange"), (0.05, "red")))
        .color_mode(common.BigValueColorMode.BACKGROUND)
    )


def dev_metric() -> timeseries.Panel:
    h = f"sum by (le) (rate(dynabert_selected_metric_bucket{{{SEL}}}[{RATE}]))"
    return (
        ts(
            "Dev metric of the chosen sub-networks",
            "Mean and p10 of the dev-set metric (from eval.json, e.g. SST-2 accuracy) of the "
            "sub-network each request was served by: the accuracy users effectively got. It drops when "
            "tight budgets or load route traffic to small sub-networks.",
            "percentunit",
        )
        .with_target(
            q(
                f"sum by (model) (rate(dynabert_selected_metric_sum{{{SEL}}}[{RATE}]))"
                f" / sum by (model) (rate(dynabert_selected_metric_count{{{SEL}}}[{RATE}]))",
                "mean {{model}}",
                "A",
            )
        )
        .with_target(q(f"histogram_quantile(0.10, {h})", "p10", "B"))
        .min(0)
        .max(1)
    )


def dev_metric_heatmap() -> heatmap.Panel:
    return (
        heatmap.Panel()
        .title("Dev metric distribution")
        .description(
            "Requests per dev-metric bucket over time (0.1-wide buckets): where the mass sits is the "
            "accuracy tier traffic is being served at."
        )
        .datasource(DS)
        .with_target(
            q(f"sum by (le) (increase(dynabert_selected_metric_bucket{{{SEL}}}[{RATE}]))", "{{le}}").format(
                PromQueryFormat.HEATMAP
            )
        )
        .calculate(False)
        .color(heatmap.HeatmapColorOptions().mode(heatmap_color_mode()).scheme("Oranges").steps(64))
        .y_axis(heatmap.YAxisConfig().unit("percentunit"))
        .cell_gap(1)
    )


def heatmap_color_mode():
    from grafana_foundation_sdk.models.heatmap import HeatmapColorMode

    return HeatmapColorMode.SCHEME


def ready_stat() -> stat.Panel:
    return (
        stat.Panel()
        .title("Ready instances")
        .description("Instances whose model is loaded and calibrated (dynabert_model_ready == 1).")
        .datasource(DS)
        .with_target(q_table(f"sum by (model) (dynabert_model_ready{{{SEL}}})"))
        .unit("short")
        .thresholds(thresholds((None, "red"), (1, "green")))
        .color_mode(common.BigValueColorMode.BACKGROUND)
    )


# --- dashboard ------------------------------------------------------------------------------------


def variables() -> list:
    datasource = (
        db.DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        .current(dm.VariableOption(selected=True, text="Prometheus", value="prometheus"))
    )

    def label_var(name: str, query: str) -> db.QueryVariable:
        return (
            db.QueryVariable(name)
            .label(name)
            .datasource(DS)
            .query({"query": query, "refId": f"{name}-variable"})
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(dm.VariableOption(selected=True, text="All", value="$__all"))
        )

    return [
        datasource,
        label_var("model", "label_values(dynabert_model_ready, model)"),
        label_var("instance", 'label_values(dynabert_model_ready{model=~"$model"}, instance)'),
    ]


def subnetwork_usage() -> db.Dashboard:
    d = (
        db.Dashboard("DynaBERT sub-network usage")
        .uid("dynabert-subnetworks")
        .description(
            "How the DynaBERT Serve policy spends its sub-networks: traffic per width x depth, latency "
            "against the budget, attainment, load, queue and the accuracy users effectively got."
        )
        .tags(["dynabert"])
        .editable()
        .timezone("browser")
        .time("now-30m", "now")
        .refresh("10s")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .variables(variables())
    )
    layout = [
        (db.Row("Sub-network usage"), None),
        (request_rate_by_subnetwork(), grid(0, 1, 15, 9)),
        (traffic_share_matrix(), grid(15, 1, 9, 9)),
        (db.Row("Latency budget"), None),
        (latency_vs_budget(), grid(0, 11, 12, 9)),
        (attainment(), grid(12, 11, 8, 9)),
        (attainment_stat(), grid(20, 11, 4, 5)),
        (ready_stat(), grid(20, 16, 4, 4)),
        (db.Row("Load and choice"), None),
        (utilisation(), grid(0, 21, 8, 9)),
        (chosen("width"), grid(8, 21, 8, 9)),
        (chosen("depth"), grid(16, 21, 8, 9)),
        (db.Row("Queue and batching"), None),
        (queue(), grid(0, 31, 8, 8)),
        (batch_and_wait(), grid(8, 31, 8, 8)),
        (threads(), grid(16, 31, 8, 8)),
        (db.Row("Errors and accuracy"), None),
        (errors(), grid(0, 40, 9, 8)),
        (error_ratio_stat(), grid(9, 40, 3, 8)),
        (selection_reasons(), grid(12, 40, 12, 8)),
        (dev_metric(), grid(0, 48, 12, 8)),
        (dev_metric_heatmap(), grid(12, 48, 12, 8)),
    ]
    y = 0
    for panel_id, (panel, pos) in enumerate(layout, start=1):
        if pos is None:  # rows: full width, placed just above the next panel
            y = _row_y(layout, panel_id)
            d = d.with_row(panel.id(panel_id).grid_pos(grid(0, y, 24, 1)))
        else:
            d = d.with_panel(panel.id(panel_id).grid_pos(pos))
    return d


def _row_y(layout: list, index: int) -> int:
    """A row sits one unit above the first panel after it."""
    for _, pos in layout[index:]:
        if pos is not None:
            return pos.y - 1
    return 0


DASHBOARDS = {"dynabert-subnetworks.json": subnetwork_usage}


def render(builder: db.Dashboard) -> str:
    """Deterministic JSON: sorted keys, two-space indent, trailing newline."""
    return json.dumps(builder.build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when a committed file differs")
    parser.add_argument("--out", type=Path, default=DASHBOARD_DIR)
    args = parser.parse_args(argv)
    stale = []
    for name, make in DASHBOARDS.items():
        path = args.out / name
        text = render(make())
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(
            "stale dashboards (run python deploy/grafana/generate.py):", *stale, sep="\n  ", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
