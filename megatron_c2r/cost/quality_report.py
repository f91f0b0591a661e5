"""What ``megatron-c2r estimate`` prints and stores for time to quality (docs/time_to_quality.md):

    quality_report(...)   one candidate against one baseline: rho from the user's loss curves,
                          tau from the cost model (or a measured step), speedup rho / tau
    recommend(...)        every routing x transport on the config's cluster ranked by modeled time
                          to quality, with the study's loss gaps (or the user's curves for their
                          candidate), and how much the best beats Megatron's best

Numbers are modeled (``cost.model``) except what the user measured; every printed line says which.
Imports torch only through ``cost.model``, inside the functions.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

from megatron_c2r.cost.time_to_quality import (
    LATE_SLOPE,
    ROUTINGS,
    TokenEfficiency,
    configuration_times,
    load_study,
    measured_step_ratio,
    nearest_study_shape,
    rank_configurations,
    step_time,
    study_rho,
)


def _fmt_ci(ci) -> str:
    return "no interval (1 pair)" if any(math.isnan(v) for v in ci) else f"95% CI [{ci[0]:.3f}, {ci[1]:.3f}]"


def quality_report(efficiency: TokenEfficiency, base_counts, cand_counts, args, params, flops,
                   tokens_per_gpu: int, *, baseline: str, candidate: str) -> Dict:
    """Print the time-to-quality table of one candidate against one baseline; return the JSON
    keys (``token_efficiency``, ``step_time_ratio``, ``time_to_quality_speedup`` and the inputs
    each came from)."""
    from megatron_c2r.cost.model import layer_time

    b = layer_time(base_counts, args.baseline_transport, params)
    c = layer_time(cand_counts, args.candidate_transport, params)
    tb = step_time(b.comm_s, b.compute_s, flops, tokens_per_gpu, args.dense_tflops)
    tc = step_time(c.comm_s, c.compute_s, flops, tokens_per_gpu, args.dense_tflops)
    tau_serial, tau_overlap = tc.serial / tb.serial, tc.overlap / tb.overlap
    comm_ratio = c.comm_s / b.comm_s
    if args.a2a_share is not None:
        tau = measured_step_ratio(args.a2a_share, comm_ratio)
        tau_from = dict(source="measured", a2a_share=args.a2a_share, step_time_ms=args.step_time_ms,
                        modeled_comm_ratio=comm_ratio,
                        formula="(1 - a2a_share) + a2a_share x modeled comm ratio")  # fmt: skip
        tau_text = f"measured step, all-to-all share {args.a2a_share:g} x modeled comm ratio {comm_ratio:.3f}"
        if args.step_time_ms is not None:
            tau_from["candidate_step_time_ms"] = tau * args.step_time_ms
            tau_text += f": {args.step_time_ms:g} -> {tau * args.step_time_ms:.1f} ms per step"
    else:
        tau = tau_overlap if args.overlap else tau_serial
        tau_from = dict(source="cost model", overlap=args.overlap, tau_no_overlap=tau_serial,
                        tau_ideal_overlap=tau_overlap, moe_layers=flops.moe_layers,
                        dense_layers=flops.dense_layers, dense_tflops=args.dense_tflops,
                        baseline_step_ms=1e3 * (tb.overlap if args.overlap else tb.serial),
                        candidate_step_ms=1e3 * (tc.overlap if args.overlap else tc.serial),
                        baseline_moe_comm_ms=1e3 * tb.moe_comm, candidate_moe_comm_ms=1e3 * tc.moe_comm,
                        expert_ms=1e3 * tb.moe_expert, rest_ms=1e3 * tb.rest,
                        no_all_to_all_ms=1e3 * tb.compute)  # fmt: skip
        tau_text = (f"modeled, {flops.moe_layers} MoE layers (comm {1e3 * tb.moe_comm:.1f} -> "
                    f"{1e3 * tc.moe_comm:.1f} ms, experts {1e3 * tb.moe_expert:.1f} ms) + rest "
                    f"{1e3 * tb.rest:.1f} ms at {args.dense_tflops:g} TFLOP/s per micro-batch; "
                    f"{'ideal overlap' if args.overlap else 'no overlap'} "
                    f"(other: {tau_serial if args.overlap else tau_overlap:.3f})")  # fmt: skip
    e, fit = efficiency, efficiency.fit
    speedup, speedup_late = e.rho / tau, e.rho_late_slope / tau
    lines = [
        f"time to quality: candidate {candidate} vs baseline {baseline}",
        f"{'quantity':<26} {'value':>8}  from",
        f"{'token efficiency rho':<26} {e.rho:8.3f}  {_fmt_ci(e.rho_ci)}; fit E + B s^-beta to "
        f"{len(e.baseline_final)} baseline file(s) (beta {fit.beta:.3f}, E {fit.E:.3f}, R^2 "
        f"{fit.r2:.3f}{', POOR FIT' if fit.poor else ''}), final loss = mean over steps "
        f"({e.steps * 2 / 3:g}, {e.steps:g}]",
        f"{'  late-slope rho':<26} {e.rho_late_slope:8.3f}  loss gap {100 * e.relative_gap:+.2f}%, "
        f"Kaplan's late slope {LATE_SLOPE}: (1 + gap)^-{1 / LATE_SLOPE:g}",
        f"{'step-time ratio tau':<26} {tau:8.3f}  {tau_text}",
        f"{'time-to-quality speedup':<26} {speedup:8.3f}  rho / tau (late slope: {speedup_late:.3f}); "
        f"> 1: the candidate reaches the baseline's loss sooner",
    ]
    for note in e.notes:
        lines.append(f"  note: {note}")
    print("\n".join(lines))
    return dict(
        token_efficiency=e.rho, token_efficiency_ci=list(e.rho_ci),
        token_efficiency_late_slope=e.rho_late_slope, step_time_ratio=tau,
        time_to_quality_speedup=speedup, time_to_quality_speedup_late_slope=speedup_late,
        inputs=dict(baseline=baseline, candidate=candidate,
                    baseline_loss=list(args.baseline_loss), candidate_loss=list(args.candidate_loss),
                    token_efficiency=e.to_json(), step_time_ratio=tau_from,
                    baseline_transport=args.baseline_transport,
                    candidate_transport=args.candidate_transport),
    )  # fmt: skip


def _user_key(args) -> Optional[str]:
    """The configuration routing the user's candidate curves stand for."""
    m = args.max_nodes
    if args.candidate_routing == "node-anchored":
        return {1: "node_M1_warmup120", 2: "node_M2"}.get(m)
    if args.candidate_routing == "megatron-node-limited":
        return f"megatron_nl_{m}" if m in (1, 2) else None
    return None


def recommend(keyed_counts, args, params, flops, shape, efficiency: Optional[TokenEfficiency]) -> Dict:
    """Rank every routing x transport by modeled time to quality on the config's cluster; print
    the table and the recommendation; return them for the JSON."""
    study = load_study()
    shape_name = nearest_study_shape(study, shape.nodes)
    entry = study["shapes"][shape_name]
    rho = {late: {} for late in (True, False)}
    source = {}
    for key, (_, study_routing, _) in ROUTINGS.items():
        for late in (True, False):
            value = study_rho(study, shape_name, study_routing, late)
            if value is not None:
                rho[late][key] = value
        if study_routing == "topk":
            source[key] = "reference (rho = 1)"
        elif study_routing in entry["gaps"]:  # routings without a study run get no rho: unranked
            source[key] = f"study {shape_name}: {entry['gaps'][study_routing]['source']}"
    user = _user_key(args)
    if efficiency is not None and user is not None:
        rho[True][user], rho[False][user] = efficiency.rho_late_slope, efficiency.rho
        source[user] = "your curves (--candidate-loss)"
    times = configuration_times(keyed_counts, params, flops, shape.tokens_per_gpu, args.dense_tflops)
    ranked = {late: rank_configurations(times, rho[late], overlap=args.overlap) for late in (True, False)}
    by_config = {(r["routing"], r["transport"]): r for r in ranked[False]}
    from megatron_c2r.cost.model import METHOD_LABELS

    head = (f"{'routing':<42} {'transport':<19} {'who':<8} {'rho late':>8} {'rho fit':>8} "
            f"{'step ms':>8}  {'vs Megatron best (late / fit)'}")  # fmt: skip
    lines = [f"recommendation on {shape.nodes} node(s) x {shape.gpus_per_node} GPUs (EP "
             f"{shape.ep_size}), modeled, uniform router scores, "
             f"{'ideal overlap' if args.overlap else 'no overlap'}; loss gaps: study shape "
             f"{shape_name} ({entry['label']}) unless marked", head, "-" * len(head)]
    def num(value, spec):
        return "—" if value is None or math.isnan(value) else format(value, spec)

    for r in ranked[True]:
        fit = by_config.get((r["routing"], r["transport"]), {})
        who = "yours" if source[r["routing"]].startswith("your") else ("Megatron" if r["megatron"] else "ours")
        lines.append(
            f"{r['label'][:42]:<42} {METHOD_LABELS[r['transport']]:<19} {who:<8} {r['rho']:8.3f} "
            f"{num(fit.get('rho'), '8.3f'):>8} {1e3 * r['step_s']:8.1f}  "
            f"{r['speedup_vs_megatron_best']:.2f}x / {num(fit.get('speedup_vs_megatron_best'), '.2f')}x"
        )
    out = dict(study_shape=shape_name, overlap=args.overlap, rho_sources=source, ranked_late=ranked[True],
               ranked_fit=ranked[False])  # fmt: skip
    for late, name in ((True, "late slope"), (False, "fitted tiny-model curves")):
        if not ranked[late]:
            continue
        best = ranked[late][0]
        megatron_best = min((r for r in ranked[late] if r["megatron"]), key=lambda r: r["time_to_quality_s"])
        lines.append(
            f"best ({name}): {best['label']} on {METHOD_LABELS[best['transport']]}: "
            f"{best['speedup_vs_megatron_best']:.2f}x Megatron's best ({megatron_best['label']} on "
            f"{METHOD_LABELS[megatron_best['transport']]}), "
            f"{best.get('speedup_vs_deepep_topk', math.nan):.2f}x flex+DeepEP top-k")
        out[f"best_{'late' if late else 'fit'}"] = dict(best=best, megatron_best=megatron_best)
    lines.append("(who: Megatron = its routing on its transport, offered today; ours = our routing, "
                 "placement or dispatcher; yours = your curves' gap. rho late = Kaplan's slope "
                 f"{LATE_SLOPE}, rho fit = the tiny study's fitted top-k curve (— where the study has "
                 "no curve for that shape); step = one micro-batch through every layer on one GPU, "
                 "modeled (pipeline stages divide it, ratios unchanged); a placement gains nothing "
                 "under uniform scores)")
    print("\n".join(lines))
    return out
