"""Tables, plot and entry point of the node mode of ``benchmarks/comm_volume.py`` (measurement:
``benchmarks/node_volume.py``, whose docstring defines every column).

Writes ``<out>/comm_volume_nodes.md``, ``<out>/comm_volume_nodes.json`` and
``<out>/internode_volume.png``; ``--docs DIR`` also writes a short form (``doc_section``) into the ``nodes`` section of
``DIR/comm_volume.md`` and the plot to ``DIR/internode_volume.png``; ``--json PATH`` copies the
JSON. Exit 1 when a check fails (dispatcher output != input, counters != the analytic counter or
``count_two_level_rows``, uniform routing off the formula by > 2%, two-level above DeepEP-style
or flat dedup on the inter-node hop).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

from benchmarks.node_volume import METHOD_LABELS, METHODS, PLACEMENT_LABELS, goal_lines, measure
from benchmarks.node_volume import uniform_checks
from benchmarks.volume_lib import SHAPES, write_doc_section, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLACEMENT_ORDER = ("megatron", "planned", "hierarchical", "balanced")


def _f(x, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _cases(records: list[dict]) -> dict:
    """{(shape, N, G): {(routing, placement): {method: record}}} in measurement order."""
    out: dict = {}
    for r in records:
        key = (r["shape"], r["nodes"], r["gpus_per_node"])
        out.setdefault(key, {}).setdefault((r["routing"], r["placement"]), {})[r["method"]] = r
    return out


def detail_table(records: list[dict]) -> list[str]:
    """Every (shape, topology, routing, placement): inter-node rows per token by method, the
    two-level intra-node rows, nodes per token, the busiest GPU / rank / node over the mean."""
    lines = [
        "| shape | N x G | routing | placement | " + " | ".join(METHOD_LABELS[m] for m in METHODS)
        + " | two-level intra-node | nodes/token | busiest GPU inter-node / mean (alltoall, "
        "two-level) | busiest rank tokens / mean | busiest node tokens / mean | two-level by |",
        "|---|---|---|---|" + "---|" * len(METHODS) + "---|---|---|---|---|---|",
    ]
    for (key, D, G), cases in _cases(records).items():
        for (routing, placement), by in cases.items():
            two, a2a = by["two_level"], by["alltoall"]
            lines.append(
                f"| {SHAPES[key]['label']} | {D} x {G} | {two['routing_label']} | "
                f"{PLACEMENT_LABELS[placement]} | "
                + " | ".join(_f(by[m]["inter_node_rows_per_token"]) for m in METHODS)
                + f" | {_f(two['intra_node_rows_per_token'])} | {_f(two['nodes_per_token'])} | "
                f"{_f(a2a['busiest_gpu_inter_node_over_mean'])}, "
                f"{_f(two['busiest_gpu_inter_node_over_mean'])} | "
                f"{_f(two['busiest_rank_tokens_over_mean'])} | "
                f"{_f(two['busiest_node_tokens_over_mean'])} | {two['measured_by']} |")
    return lines


def balance_table(records: list[dict]) -> list[str]:
    """Issue 15's before/after: busiest / mean per placement, side by side (tokens = expert
    input rows; received = rows a GPU receives from other GPUs with the two-level dispatcher)."""
    present = [p for p in PLACEMENT_ORDER if any(r["placement"] == p for r in records)]
    names = ", ".join(PLACEMENT_LABELS[p] for p in present)
    lines = [f"| shape | N x G | routing | busiest rank tokens / mean ({names}) | busiest node "
             f"tokens / mean | busiest rank received rows / mean | busiest node received "
             f"inter-node rows / mean |", "|---|---|---|---|---|---|---|"]
    for (key, D, G), cases in _cases(records).items():
        for routing in dict.fromkeys(r for r, _ in cases):
            def cell(field, routing=routing, cases=cases):
                return ", ".join(_f(cases[(routing, p)]["two_level"][field])
                                 if (routing, p) in cases else "—" for p in present)

            label = cases[next(c for c in cases if c[0] == routing)]["two_level"]["routing_label"]
            lines.append(f"| {SHAPES[key]['label']} | {D} x {G} | {label} | "
                         f"{cell('busiest_rank_tokens_over_mean')} | "
                         f"{cell('busiest_node_tokens_over_mean')} | "
                         f"{cell('busiest_rank_received_over_mean')} | "
                         f"{cell('busiest_node_received_over_mean')} |")
    return lines


# Plot: the routings of one shape, one panel per topology.
PLOT_CASES = (("uniform", "megatron", "uniform"), ("trained_topk", "megatron", "top-k\ncontig."),
              ("trained_topk", "hierarchical", "top-k\nhier."),
              ("megatron_nl", "hierarchical", "Megatron\nNL N/2 of N\nhier."),
              ("node_anchored_M2", "hierarchical", "ours\nM=2 hier."),
              ("node_anchored_M1", "hierarchical", "ours\nM=1 hier."))
PLOT_COLORS = {"alltoall": "0.55", "deepep": "#fd8d3c", "flat": "#6baed6", "two_level": "#238b45"}


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = _cases(records)
    panels = []  # the largest shape measured on each topology
    for topo in dict.fromkeys((D, G) for (_, D, G) in cases):
        keys = [k for k in cases if k[1:] == topo]
        panels.append(max(keys, key=lambda k: SHAPES[k[0]]["experts"]))
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (key, D, G) in zip(axes.flat, panels):
        mine, labels = [], []
        for routing, placement, label in PLOT_CASES:
            if routing == "megatron_nl":
                routing = f"megatron_nl_M{max(1, D // 2)}"
            if (routing, placement) in cases[(key, D, G)]:
                mine.append(cases[(key, D, G)][(routing, placement)])
                labels.append(label)
        width = 0.8 / len(METHODS)
        for j, method in enumerate(METHODS):
            xs = [i + (j - len(METHODS) / 2 + 0.5) * width for i in range(len(mine))]
            ax.bar(xs, [c[method]["inter_node_rows_per_token"] for c in mine], width,
                   label=METHOD_LABELS[method], color=PLOT_COLORS[method])
        ax.axhline((D - 1) / D, color="k", linestyle="dotted", linewidth=1,
                   label="(N-1)/N: one remote node per token")
        ax.set_xticks(range(len(mine)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(f"{SHAPES[key]['label']}\n{D} nodes x {G} GPUs "
                     f"({mine[0]['two_level']['measured_by']})", fontsize=9)
        ax.set_ylabel("inter-node rows per token (dispatch)")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("Inter-node rows per token by method (benchmarks/comm_volume.py node mode)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def not_applicable_lines(items: list[dict]) -> list[str]:
    """The skipped (shape, topology, routing, placement) combinations, one line per reason."""
    by_reason: dict = {}
    for x in items:
        reason = x["reason"].split(":")[0] if x["reason"].startswith("M=") else x["reason"]
        what = f"{SHAPES[x['shape']]['label']} {x['nodes']} x {x['gpus_per_node']}"
        if x["routing"] != "all":
            what += f" {x['routing']}"
        by_reason.setdefault(reason, []).append(what)
    return [f"- {reason}: {', '.join(dict.fromkeys(whats))}" for reason, whats in by_reason.items()]


def render(payload: dict) -> tuple[str, int]:
    """(markdown, exit status) from a measurement payload (``measure`` + command, settings)."""
    records, checks = payload["records"], payload["checks"]
    formula = uniform_checks(records)
    goals, invariants_ok = goal_lines(records)
    bad = [c for c in checks if c["outputs_failed"] or c["counter_mismatches"]
           or c["count_two_level_rows_mismatches"]]
    md = [f"Inter-node rows per token (dispatch; combine returns the same rows), measured with "
          f"`{payload['command']}` ({payload['settings']}). Columns: `benchmarks/node_volume.py`.",
          "", "Goals (issue 14), per topology:", "", *goals, "",
          "Every routing and placement (inter-node rows per token by method, then the two-level "
          "dispatcher's intra-node rows and the load columns):", "", *detail_table(records), "",
          "Where the load lands (issue 15): busiest / mean per placement, before (contiguous) "
          "and after (planned, hierarchical, balanced):", "", *balance_table(records), "",
          "Uniform-routing checks, two-level inter-node rows vs D(1-C(E-E/D,k)/C(E,k))(D-1)/D, "
          "tolerance 2%:", ""]
    md += [f"- {SHAPES[c['shape']]['label']} {c['nodes']} x {c['gpus_per_node']}: measured "
           f"{c['measured']:.3f} vs formula {c['formula']:.3f} ({100 * c['rel_error']:+.2f}%) "
           f"{'OK' if c['ok'] else 'FAIL'}" for c in formula]
    md += ["", f"Counter checks: {len(checks)} cases, {sum(c['gloo'] for c in checks)} on real "
               f"gloo dispatchers (outputs == inputs, per-rank counters == the analytic counter), "
               f"all {len(checks)} analytic == count_two_level_rows on every source rank: "
               f"{'all passed' if not bad else f'{len(bad)} FAILED'}."]
    if payload["not_applicable"]:
        md += ["", "Not applicable:", "", *not_applicable_lines(payload["not_applicable"])]
    failures = []
    if bad:
        failures.append(f"FAILED counter/output checks: {bad}")
    if not all(c["ok"] for c in formula):
        failures.append("FAILED: uniform routing is off the formula by more than 2%")
    if not invariants_ok:
        failures.append("FAILED: the two-level dispatcher shipped more inter-node rows than "
                        "DeepEP-style or the flat dedup")
    for line in failures:
        print(line)
    return "\n".join(md) + "\n", int(bool(failures))


def doc_section(full: str, out_dir: str) -> str:
    """The short form of ``render``'s markdown that goes into docs/comm_volume.md: the command
    and settings, the uniform-routing and counter checks, and where the full tables are (every
    routing x placement, balance and per-topology goals: ``<out>/comm_volume_nodes.md``, rebuilt
    by the same command or by ``--render-json`` from its JSON)."""
    head = full.split("\n\n")[0]
    checks = full[full.index("Uniform-routing checks"):]
    where = (f"Full output (every routing x placement with its intra-node rows, the balance table, "
             f"the goals per topology): `{out_dir}/comm_volume_nodes.md`, written by the command "
             f"above, or rebuilt from its JSON with `python benchmarks/comm_volume.py --nodes 2 "
             f"--gpus-per-node 2 --render-json {out_dir}/comm_volume_nodes.json`. The key rows are "
             "in the table at the top of this page.")
    return "\n\n".join([head, where, checks.rstrip()]) + "\n"


def main_nodes(args, argv=None) -> int:
    """The node mode of ``comm_volume.py`` (``--nodes``/``--gpus-per-node`` given). With
    ``--render-json PATH`` the tables and plot are rebuilt from a saved JSON (its own command
    and records) instead of measuring."""
    t0 = time.perf_counter()
    if args.render_json:
        with open(args.render_json, encoding="utf-8") as f:
            payload = json.load(f)
    else:
        payload = measure(args)
        gloo_topos = sorted({(c["nodes"], c["gpus_per_node"]) for c in payload["checks"]
                             if c["gloo"]})
        cmd = "python benchmarks/comm_volume.py " + " ".join(sys.argv[1:] if argv is None else argv)
        settings = (
            f"trained routing: the tiny models of the flat mode ({args.train_steps} steps, 4 "
            f"layers, softmax top-k, aux loss {args.aux_loss_coeff:g}), placement planned on "
            f"{args.capture_batches // 2} x 8 x 128 held-out tokens, measured on the other "
            f"{args.capture_batches // 2} x 8 x 128; uniform: {args.uniform_tokens} tokens; real "
            "gloo dispatchers at " + (", ".join(f"{d} x {g}" for d, g in gloo_topos) or "no "
                                      "topology") + ", analytic counter above")
        payload.update(command=cmd.strip(), settings=settings)
    text, status = render(payload)
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "comm_volume_nodes.md"), "w", encoding="utf-8") as f:
        f.write(text)
    if not args.render_json:
        payload.update(formula_checks=uniform_checks(payload["records"]),
                       goals=goal_lines(payload["records"])[0], wall_s=time.perf_counter() - t0)
        for path in [os.path.join(args.out, "comm_volume_nodes.json")] + (
                [args.json] if args.json else []):
            write_json(path, payload)
    png = os.path.join(args.out, "internode_volume.png")
    plot(payload["records"], png)
    if args.docs:
        os.makedirs(args.docs, exist_ok=True)
        shutil.copy(png, os.path.join(args.docs, "internode_volume.png"))
        write_doc_section(os.path.join(args.docs, "comm_volume.md"), "nodes",
                          doc_section(text, os.path.relpath(args.out, ROOT)))
    print(f"wrote {args.out}/comm_volume_nodes.md, internode_volume.png in "
          f"{time.perf_counter() - t0:.0f} s")
    return status
