"""Tables and plot of the flat EP mode of ``benchmarks/comm_volume.py`` (rows per token per EP
rank; the node mode's are in ``node_report.py``).

Legend for shape suffixes: as in ``comm_volume.py``.
"""

from __future__ import annotations

import math

from benchmarks.volume_lib import SHAPES

MAX_GROUPS = (1, 2)
# contiguous expert blocks (dedup only) / planned / planned with every rank's expected load <=
# LOAD_BOUND x the mean (issue 15's goal; only when the planner has max_load_imbalance)
PLACEMENTS = ("megatron", "planned", "balanced")
LOAD_BOUND = 1.10


def minimum_rows(experts: int, topk: int, ep: int) -> int:
    """Fewest ranks a token with k experts can touch: ceil(k / (E/P))."""
    return math.ceil(topk / (experts // ep))


# ------------------------------------------------------------------------------------------------
# Report: formula checks, tables, plot
# ------------------------------------------------------------------------------------------------
ROUTING_LABELS = {"uniform": "uniform random", "trained_topk": "trained top-k",
                  "trained": "trained top-k, C2R, group, group-limited"}


def routing_label(name: str, ep: int) -> str:
    if name in ROUTING_LABELS:
        return ROUTING_LABELS[name]
    if name == "moge":
        return f"MoGE (k/{ep} per rank)"
    if name.startswith("c2r_T"):
        return f"C2R T={name[5:]}"
    m = name.rsplit("_M", 1)[1]
    if name.startswith("anchored"):
        return f"group M={m}, anchored"
    if name.startswith("group_score"):
        return f"group M={m}, group-score"
    return f"Megatron group-limited {m} of {ep}"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _load(result: dict | None, field: str = "rank_load_imbalance") -> str:
    return "—" if result is None else f"{result[field]:.2f}"


def formula_checks(results: list[dict]) -> list[dict]:
    from megatron_c2r.comm.accounting import expected_ranks_per_token_uniform

    checks = []
    for r in results:
        if r["routing"] == "uniform" and r["placement"] == "megatron":
            s = SHAPES[r["shape"]]
            want = expected_ranks_per_token_uniform(s["experts"], s["topk"], r["ep"])
            err = r["rows_per_token"] / want - 1
            checks.append(dict(shape=r["shape"], ep=r["ep"], measured=r["rows_per_token"],
                               formula=want, rel_error=err, ok=abs(err) <= 0.02))
    return checks


def index_results(results: list[dict]) -> dict:
    return {(r["shape"], r["ep"], r["routing"], r["placement"]): r for r in results}


def detail_table(args, results, na_by_key) -> list[str]:
    """Every routing: alltoall | dedup only | dedup + planned | + balanced planned | minimum, and
    the busiest rank's load (expert input rows) and received rows over the mean per placement."""
    idx = index_results(results)
    lines = [("| shape | EP | routing | alltoall (k) | dedup only | dedup + planned placement "
              f"| dedup + balanced placement (load <= {LOAD_BOUND:.2f}x) | minimum | alltoall / "
              "best | busiest rank load / mean (Megatron, planned, balanced) | busiest rank "
              "received rows / mean (Megatron, planned, balanced) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in args.shapes:
        s = SHAPES[key]
        for ep in args.ep:
            if s["experts"] % ep:
                lines.append(f"| {s['label']} | {ep} | all | n/a: {s['experts']} experts are "
                             f"not divisible by EP={ep} |" + "  |" * 7)
                continue
            routings = []
            for r in results:
                if r["shape"] == key and r["ep"] == ep and r["routing"] not in routings:
                    routings.append(r["routing"])
            for name in routings:
                by = [idx.get((key, ep, name, p)) for p in PLACEMENTS]
                alltoall = next(x for x in by if x)["rows_per_token_alltoall"]
                best = min(x["rows_per_token"] for x in by if x)
                rows = " | ".join(_fmt(x["rows_per_token"]) if x else "—" for x in by)
                loads = ", ".join(_load(x) for x in by)
                received = ", ".join(_load(x, "rank_received_imbalance") for x in by)
                lines.append(
                    f"| {s['label']} | {ep} | {routing_label(name, ep)} | {alltoall:.2f} | "
                    f"{rows} | {minimum_rows(s['experts'], s['topk'], ep)} | "
                    f"{alltoall / best:.2f}x | {loads} | {received} |")
            for item in na_by_key.get((key, ep), []):
                lines.append(f"| {s['label']} | {ep} | {routing_label(item['routing'], ep)} | "
                             f"n/a: {item['reason']} |" + "  |" * 7)
    return lines


def summary_rows(args, results, trained) -> list[dict]:
    """One row per (shape, EP) in the issue's columns (trained routing, C2R at the smallest T,
    group mode anchored)."""
    idx = index_results(results)
    rows = []
    for key in args.shapes:
        s = SHAPES[key]
        for ep in args.ep:
            row = dict(shape=key, label=s["label"], ep=ep, k=s["topk"],
                       minimum=minimum_rows(s["experts"], s["topk"], ep))
            if s["experts"] % ep:
                row["na"] = f"{s['experts']} experts not divisible by EP={ep}"
                rows.append(row)
                continue

            def get(name, placement, key=key, ep=ep):
                return (idx.get((key, ep, name, placement)) or {}).get("rows_per_token")

            t_min = min(s["top_t"])
            row.update(
                uniform=get("uniform", "megatron"),
                dedup=get("trained_topk", "megatron"),
                planned=get("trained_topk", "planned"),
                c2r=get(f"c2r_T{t_min}", "planned"), c2r_t=t_min,
                anchored_m2=get("anchored_M2", "planned"),
                anchored_m1=get("anchored_M1", "planned"),
                megatron_gl_m1=get("megatron_gl_M1", "megatron"),
                val_loss=(trained.get(key) or {}).get("val_loss"),
            )
            rows.append(row)
    return rows


def summary_table(rows: list[dict]) -> list[str]:
    lines = [("| shape | EP | alltoall (k) | uniform: dedup | trained: dedup only | + planned "
              "placement | + C2R (smallest T, planned) | group M=2 anchored | group M=1 anchored "
              "| minimum |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "na" in r:
            lines.append(f"| {r['label']} | {r['ep']} | {r['k']} | n/a: {r['na']} |  |  |  |  "
                         f"|  | {r['minimum']} |")
            continue
        c2r = "n/a" if r["c2r"] is None else f"{r['c2r']:.2f} (T={r['c2r_t']})"
        lines.append(f"| {r['label']} | {r['ep']} | {r['k']} | {_fmt(r['uniform'])} | "
                     f"{_fmt(r['dedup'])} | {_fmt(r['planned'])} | {c2r} | "
                     f"{_fmt(r['anchored_m2'])} | {_fmt(r['anchored_m1'])} | {r['minimum']} |")
    return lines


def plot(rows: list[dict], eps: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("alltoall (k)", "k", "0.55"), ("dedup, uniform routing", "uniform", "#c6dbef"),
              ("dedup, trained top-k", "dedup", "#6baed6"),
              ("+ planned placement", "planned", "#2171b5"),
              ("+ C2R (smallest T)", "c2r", "#fd8d3c"),
              ("group M=2 anchored", "anchored_m2", "#74c476"),
              ("group M=1 anchored", "anchored_m1", "#238b45")]
    fig, axes = plt.subplots(1, len(eps), figsize=(6.5 * len(eps), 4.2), squeeze=False)
    for ax, ep in zip(axes[0], eps):
        mine = [r for r in rows if r["ep"] == ep and "na" not in r]
        width = 0.8 / len(series)
        for j, (label, field, color) in enumerate(series):
            xs = [i + (j - len(series) / 2 + 0.5) * width for i in range(len(mine))]
            ys = [r.get(field) or 0.0 for r in mine]
            ax.bar(xs, ys, width, label=label, color=color)
        for i, r in enumerate(mine):
            ax.hlines(r["minimum"], i - 0.42, i + 0.42, colors="k", linestyles="dotted",
                      label="physical minimum" if i == 0 else None)
        ax.set_xticks(range(len(mine)))
        ax.set_xticklabels([f"{SHAPES[r['shape']]['experts']}e top-{r['k']}" for r in mine])
        ax.set_ylabel("rows shipped per token (dispatch)")
        ax.set_title(f"EP={ep} (measured on gloo, dedup dispatcher counters)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
