"""Time to quality: is a cheaper step worth the extra steps a constrained routing needs?

A routing that ships fewer bytes per token makes each step cheaper (step-time ratio tau < 1) but
may need more steps to the same loss (token efficiency rho < 1). The candidate reaches the
baseline's quality sooner iff rho / tau > 1 (Switch Transformer's time-to-threshold method,
arXiv 2101.03961; docs/time_to_quality.md).

    read_loss_curve(path)       one run's (iteration, loss) points: the CPU job's history.csv, any
                                CSV with ``iteration`` and ``loss`` columns, or a Megatron-LM
                                TensorBoard event file / directory (scalar ``lm loss``)
    token_efficiency(b, c)      rho from baseline and candidate curves (several seeds each):
                                fit L_b(s) = E + B * s^-beta to the baseline, solve for s* where
                                it reaches the candidate's final loss, rho = s*/S; a t-interval
                                over seed pairs; the late-training figure from Kaplan's slope
    rho_from_gap(fit, S, gap)   rho for a known relative loss gap (the study's documented gaps)
    step_flops(cfg)             the non-expert FLOPs of one step (attention, dense layers, shared
                                experts, logits) from a run config, for the step-time ratio
    step_time(...)              one micro-batch's modeled time per GPU: MoE layers from the cost
                                model (with and without comm/compute overlap) + the rest

"Final loss" is the study's fresh-batch loss (``benchmarks/quality.py``): the mean training loss
over the last third of the run. The baseline fit is compared on the same window: the fitted
curve's mean over [s - s/3, s] is solved for s*, so a candidate that needs exactly m times the
steps gives rho = 1/m (a unit test recovers it within 3%). Each candidate seed is paired with the
baseline seed at the same position (same initialisation and data order when the runs share
seeds); its gap to that seed is added to the fit's value at S.

Every problem with an input raises ValueError naming the file, the value and the fix (the CLI
prints it in one line, exit 2, before anything is written). Files are read with bounded sizes.
Pure Python + numpy (tensorboard only to read event files); no Megatron, no YAML.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_c2r.files import check_file

if TYPE_CHECKING:  # annotations only: the CLI imports this module before torch
    from megatron_c2r.cost.inputs import RoutingRule
    from megatron_c2r.cost.model import RoutingCounts

# Kaplan et al. (arXiv 2001.08361): late in pretraining loss falls as compute^-0.05, so a run
# whose loss is (1 + d) times higher needs (1 + d)^(1/0.05) = (1 + d)^20 times the steps.
LATE_SLOPE = 0.05
WINDOW_FRACTION = 1 / 3  # the study's fresh-batch window: the last third of the run
FIT_START_FRACTION = 0.1  # fit from S/10: skips the LR warm-up and the steepest early steps
FIT_BINS = 40  # log-spaced bins per seed (smoothing; the late steps are not swamped)
MIN_FIT_POINTS = 10  # logged points per baseline file inside the fit range
MIN_WINDOW_POINTS = 3  # logged points per file inside the final-loss window
POOR_FIT_R2 = 0.9  # binned means explained below this: the fit is reported as poor
MAX_CSV_BYTES = 256 << 20
MAX_EVENT_BYTES = 1 << 30  # all event files of one directory together
MAX_EVENT_FILES = 256
TB_TAG = "lm loss"  # Megatron-LM's training_log scalar (and the CPU job's)
# Two-sided 95% Student t quantiles by degrees of freedom (a t-interval over a few seed pairs).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def t95(dof: int) -> float:
    """The two-sided 95% t quantile (the nearest tabulated dof at or below; 1.96 beyond 30)."""
    if dof > 30:
        return 1.96
    return T95[max(d for d in T95 if d <= dof)]


# --------------------------------------------------------------------------------------------
# Reading loss curves
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossCurve:
    """One run's training loss: float64 ``steps_N`` (increasing iterations) and ``loss_N``."""

    path: str
    kind: str  # 'csv' or 'tensorboard'
    steps_N: np.ndarray
    loss_N: np.ndarray

    @property
    def last_step(self) -> int:
        return int(self.steps_N[-1])

    def window(self, end: float, fraction: float = WINDOW_FRACTION) -> np.ndarray:
        """Losses logged in the final-loss window (end - fraction * end, end]."""
        keep = (self.steps_N > end * (1 - fraction)) & (self.steps_N <= end)
        return self.loss_N[keep]


def read_loss_curve(path: str, what: str = "loss file") -> LossCurve:
    """A run's (iteration, loss) points from a CSV file or TensorBoard events (file or
    directory, searched recursively). Raises ValueError / FileNotFoundError naming ``path``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist: pass the run's history.csv, a "
                                "CSV with iteration,loss columns or its TensorBoard directory")
    if os.path.isdir(path) or os.path.basename(path).startswith("events.out.tfevents"):
        steps, losses = _read_tensorboard(path, what)
        kind = "tensorboard"
    else:
        steps, losses = _read_csv(path, what)
        kind = "csv"
    if not steps:
        raise ValueError(f"{what} {path!r} has no loss points: pass a run that logged its loss")
    # Resumed runs log some iterations twice: the later record wins.
    by_step = dict(zip(steps, losses))
    steps_N = np.array(sorted(by_step), dtype=np.float64)
    loss_N = np.array([by_step[s] for s in sorted(by_step)], dtype=np.float64)
    if steps_N[0] < 0:
        raise ValueError(f"{what} {path!r}: iteration {steps_N[0]:g} is negative: pass training "
                         "iterations (1, 2, ...)")
    return LossCurve(path=path, kind=kind, steps_N=steps_N, loss_N=loss_N)


def _read_csv(path: str, what: str) -> Tuple[List[float], List[float]]:
    check_file(path, what, MAX_CSV_BYTES)
    with open(path, "rb") as f:
        raw = f.read(MAX_CSV_BYTES + 1)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path!r} is not UTF-8 text: pass a CSV with iteration,loss "
                         "columns (or a TensorBoard directory)") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in ("iteration", "loss") if c not in columns]
    if missing:
        raise ValueError(f"{what} {path!r} has no {' and no '.join(repr(c) for c in missing)} "
                         f"column (columns: {', '.join(columns) or 'none'}): pass a CSV whose "
                         "header names iteration and loss, e.g. the CPU job's history.csv")
    reader.fieldnames = columns
    steps, losses = [], []
    for lineno, row in enumerate(reader, start=2):
        values = []
        for name in ("iteration", "loss"):
            cell = (row.get(name) or "").strip()
            try:
                value = float(cell)
            except ValueError:
                raise ValueError(f"{what} {path!r} line {lineno}: {name}={cell!r} is not a number: "
                                 "fix or delete that row") from None
            if not math.isfinite(value):
                raise ValueError(f"{what} {path!r} line {lineno}: {name}={cell} is not finite (a "
                                 "diverged run?): pass a run whose loss stayed finite")
            values.append(value)
        steps.append(values[0])
        losses.append(values[1])
    return steps, losses


def _event_files(path: str, what: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.startswith("events.out.tfevents")]
        if len(found) > MAX_EVENT_FILES:
            raise ValueError(f"{what} {path!r} holds over {MAX_EVENT_FILES} event files: pass the "
                             "run's own TensorBoard directory")
    if not found:
        raise ValueError(f"{what} {path!r} is a directory without TensorBoard event files "
                         "(events.out.tfevents.*): pass the run's --tensorboard-dir or its "
                         "history.csv")
    total = sum(os.path.getsize(f) for f in found)
    if total > MAX_EVENT_BYTES:
        raise ValueError(f"{what} {path!r}: its event files hold {total / 2**20:.0f} MiB, over the "
                         f"{MAX_EVENT_BYTES >> 20} MiB this reader accepts: pass one run's "
                         "directory")
    return found


def _read_tensorboard(path: str, what: str) -> Tuple[List[float], List[float]]:
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
        from tensorboard.util import tensor_util
    except ImportError:
        raise ValueError(f"{what} {path!r} is TensorBoard output and the tensorboard package is "
                         "not installed: pip install tensorboard (or pass a CSV)") from None
    steps, losses = [], []
    for file in _event_files(path, what):
        check_file(file, what, MAX_EVENT_BYTES)
        try:
            for event in EventFileLoader(file).Load():
                for value in event.summary.value:
                    if value.tag != TB_TAG:
                        continue
                    if value.HasField("simple_value"):
                        number = float(value.simple_value)
                    else:  # TF2-style summaries store the scalar as a tensor
                        number = float(tensor_util.make_ndarray(value.tensor).reshape(()))
                    if not math.isfinite(number):
                        raise ValueError(f"{what} {file!r}: '{TB_TAG}' at step {event.step} is "
                                         f"{number} (a diverged run?): pass a run whose loss "
                                         "stayed finite")
                    steps.append(float(event.step))
                    losses.append(number)
        except ValueError:
            raise
        except Exception as exc:  # damaged records: tensorboard raises its own error types
            raise ValueError(f"{what} {file!r} is not a readable TensorBoard event file "
                             f"({type(exc).__name__}): pass the run's event files") from None
    if not steps:
        raise ValueError(f"{what} {path!r} has no '{TB_TAG}' scalar (Megatron-LM writes it with "
                         "--tensorboard-dir and --log-interval): pass the training run's events")
    return steps, losses


# --------------------------------------------------------------------------------------------
# The baseline fit
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerLawFit:
    """L(s) = E + B * s^-beta fitted to binned baseline losses; ``r2`` of the binned means."""

    E: float
    B: float
    beta: float
    r2: float
    fit_from: float
    fit_to: float
    points: int
    poor: bool
    note: str = ""

    def loss(self, s):
        return self.E + self.B * np.power(s, -self.beta)

    def window_mean(self, s: float, fraction: float = WINDOW_FRACTION) -> float:
        """Mean of the fitted loss over [s (1 - fraction), s] (the final-loss window of a run
        of s steps), in closed form."""
        a, b = s * (1 - fraction), s
        if abs(1 - self.beta) < 1e-9:
            integral = self.B * math.log(b / a)
        else:
            integral = self.B * (b ** (1 - self.beta) - a ** (1 - self.beta)) / (1 - self.beta)
        return self.E + integral / (b - a)

    def steps_to(self, target: float, S: float, fraction: float = WINDOW_FRACTION) -> Tuple[float, str]:
        """s* where ``window_mean(s*) == target`` (bisection on log s within [S/1000, 1000 S]),
        and a note when the target lies outside (s* clipped to that range)."""
        lo, hi = S / 1000, S * 1000
        if target <= self.window_mean(hi, fraction):
            at_e = " (at or below the fit's asymptote E)" if target <= self.E else ""
            return hi, f"the baseline fit does not reach {target:.4f} within 1000x the steps{at_e}"
        if target >= self.window_mean(lo, fraction):
            return lo, f"{target:.4f} is above the fit at S/1000"
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            if self.window_mean(mid, fraction) > target:
                lo = mid
            else:
                hi = mid
        return math.sqrt(lo * hi), ""


def _binned(curve: LossCurve, start: float, end: float, bins: int) -> Tuple[np.ndarray, np.ndarray]:
    """Mean step and loss in log-spaced bins over [start, end] (empty bins dropped)."""
    keep = (curve.steps_N >= start) & (curve.steps_N <= end)
    s, y = curve.steps_N[keep], curve.loss_N[keep]
    edges = np.geomspace(max(start, 1.0), end + 1e-9, bins + 1)
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
    xs, ys = [], []
    for b in range(bins):
        sel = which == b
        if sel.any():
            xs.append(s[sel].mean())
            ys.append(y[sel].mean())
    return np.array(xs), np.array(ys)


def fit_power_law(curves: Sequence[LossCurve], end: Optional[float] = None,
                  start_fraction: float = FIT_START_FRACTION, bins: int = FIT_BINS) -> PowerLawFit:
    """Least squares of E + B s^-beta on every seed's log-binned losses over [S/10, S]: a grid
    over beta in [0.005, 3] (E, B linear for each), refined by golden section. Raises ValueError
    naming a file with too few points in that range."""
    S = float(end if end is not None else min(c.last_step for c in curves))
    start = max(1.0, S * start_fraction)
    xs, ys = [], []
    for c in curves:
        n = int(((c.steps_N >= start) & (c.steps_N <= S)).sum())
        if n < MIN_FIT_POINTS:
            raise ValueError(f"baseline loss file {c.path!r} has {n} logged points in steps "
                             f"[{start:g}, {S:g}] (the fit range), at least {MIN_FIT_POINTS} "
                             "needed: log the loss more often (--log-interval) or run longer")
        x, y = _binned(c, start, S, bins)
        xs.append(x)
        ys.append(y)
    x, y = np.concatenate(xs), np.concatenate(ys)

    def solve(beta: float) -> Tuple[float, float, float]:
        basis = np.stack([np.ones_like(x), np.power(x, -beta)], axis=1)
        (E, B), *_ = np.linalg.lstsq(basis, y, rcond=None)
        return float(np.sum((basis @ np.array([E, B]) - y) ** 2)), float(E), float(B)

    grid = np.geomspace(0.005, 3.0, 120)
    sse = [solve(b)[0] for b in grid]
    i = int(np.argmin(sse))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if solve(a)[0] < solve(b)[0]:
            hi = b
        else:
            lo = a
    beta = (lo + hi) / 2
    err, E, B = solve(beta)
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1 - err / total if total > 0 else 0.0
    problems, remarks = [], []
    if r2 < POOR_FIT_R2:
        problems.append(f"R^2 {r2:.2f} < {POOR_FIT_R2}")
    if B <= 0:
        problems.append("the loss does not fall over the fit range (B <= 0)")
    if beta >= 2.99:
        problems.append(f"beta {beta:.3g} at the top of the search range")
    elif beta <= 0.0051 or E < 0:  # E + B s^-beta -> E + B - B beta ln s as beta -> 0
        remarks.append(f"log-linear over the fit range (beta {beta:.3g}, E {E:.3g} < 0: no "
                       "asymptote identified): rho rests on the local slope")
    return PowerLawFit(E=E, B=B, beta=beta, r2=r2, fit_from=start, fit_to=S, points=len(x),
                       poor=bool(problems), note="; ".join(problems + remarks))  # fmt: skip


# --------------------------------------------------------------------------------------------
# Token efficiency
# --------------------------------------------------------------------------------------------
def late_slope_rho(relative_gap: float, slope: float = LATE_SLOPE) -> float:
    """rho from Kaplan's late-training slope: 1 / (1 + gap)^(1/slope) (gap = L_c / L_b - 1)."""
    return (1 + relative_gap) ** (-1 / slope)


def rho_from_gap(fit: PowerLawFit, S: float, relative_gap: float) -> Tuple[float, str]:
    """rho of a candidate whose final loss is (1 + ``relative_gap``) times the baseline's, on the
    baseline fit (the fitted window mean at S stands for the baseline's final loss)."""
    target = fit.window_mean(S) * (1 + relative_gap)
    s_star, note = fit.steps_to(target, S)
    return s_star / S, note


@dataclass
class TokenEfficiency:
    """rho = s*/S: the mean over seed pairs, its 95% t-interval, each pair's value, the relative
    final-loss gap, the late-slope figure and the fit it came from."""

    rho: float
    rho_ci: Tuple[float, float]
    rho_pairs: List[float]
    steps: float
    baseline_final: List[float]
    candidate_final: List[float]
    relative_gap: float
    relative_gap_sem: Optional[float]
    rho_late_slope: float
    fit: PowerLawFit
    notes: List[str] = field(default_factory=list)

    def to_json(self) -> Dict:
        out = asdict(self)
        out["fit"] = asdict(self.fit)
        return out


def final_losses(curves: Sequence[LossCurve], end: float, side: str) -> List[float]:
    """Each file's mean loss in the window (end - end/3, end]; ValueError naming a file that
    stops before ``end`` or logs too few points there."""
    out = []
    for c in curves:
        if c.last_step < end:
            raise ValueError(f"{side} loss file {c.path!r} ends at step {c.last_step}, before the "
                             f"end of the baseline window ({end * (1 - WINDOW_FRACTION):g}, {end:g}]: "
                             f"run the {side} for at least {end:g} steps, as long as the baseline")
        window = c.window(end)
        if len(window) < MIN_WINDOW_POINTS:
            raise ValueError(f"{side} loss file {c.path!r} has {len(window)} logged points in the "
                             f"window ({end * (1 - WINDOW_FRACTION):g}, {end:g}], at least "
                             f"{MIN_WINDOW_POINTS} needed: log the loss more often (--log-interval)")
        out.append(float(window.mean()))
    return out


def token_efficiency(baseline: Sequence[LossCurve], candidate: Sequence[LossCurve]) -> TokenEfficiency:
    """rho of the candidate runs against the baseline runs (module docstring). S is the shortest
    baseline run; candidates must reach it. Raises ValueError naming the file at fault."""
    if not baseline or not candidate:
        raise ValueError("--baseline-loss and --candidate-loss each need at least one file")
    S = float(min(c.last_step for c in baseline))
    base_final = final_losses(baseline, S, "baseline")
    cand_final = final_losses(candidate, S, "candidate")
    fit = fit_power_law(baseline, end=S)
    notes = []
    if fit.poor:
        notes.append(f"poor baseline fit ({fit.note}): read rho with care")
    elif fit.note:
        notes.append(f"baseline fit: {fit.note}")
    if any(c.last_step > S for c in candidate):
        notes.append(f"candidates compared at step {S:g} (the shortest baseline run)")
    pairs = min(len(baseline), len(candidate))
    if len(baseline) != len(candidate):
        notes.append(f"{len(baseline)} baseline and {len(candidate)} candidate files: the first "
                     f"{pairs} of each are paired in the order given")
    fitted_final = fit.window_mean(S)
    rhos, gaps = [], []
    for b, c in zip(base_final[:pairs], cand_final[:pairs]):
        s_star, note = fit.steps_to(fitted_final + (c - b), S)
        rhos.append(s_star / S)
        gaps.append(c / b - 1)
        if note and note not in notes:
            notes.append(note)
    rho = float(np.mean(rhos))
    if pairs > 1:
        half = t95(pairs - 1) * float(np.std(rhos, ddof=1)) / math.sqrt(pairs)
        ci = (rho - half, rho + half)
        gap_sem = float(np.std(gaps, ddof=1)) / math.sqrt(pairs)
    else:
        ci, gap_sem = (math.nan, math.nan), None
        notes.append("one seed pair: no confidence interval")
    gap = float(np.mean(gaps))
    notes.append("the fit is to intermediate points of full-length runs; a separately scheduled "
                 "shorter run reaches less (Hagele et al., arXiv 2405.18392)")
    return TokenEfficiency(rho=rho, rho_ci=ci, rho_pairs=rhos, steps=S, baseline_final=base_final,
                           candidate_final=cand_final, relative_gap=gap, relative_gap_sem=gap_sem,
                           rho_late_slope=late_slope_rho(gap), fit=fit, notes=notes)  # fmt: skip


# --------------------------------------------------------------------------------------------
# The rest of the step: non-expert FLOPs from a run config
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepFlops:
    """Forward+backward FLOPs per token of one whole step outside the routed experts:
    ``per_moe_layer`` (attention + shared expert + router of one MoE layer), ``per_dense_layer``
    (attention + dense MLP), ``head`` (output logits), and the layer counts."""

    per_moe_layer: float
    per_dense_layer: float
    head: float
    moe_layers: int
    dense_layers: int
    tensor_parallel: int

    def total(self) -> float:
        return self.moe_layers * self.per_moe_layer + self.dense_layers * self.per_dense_layer + self.head


def _moe_layer_count(freq, layers: int) -> int:
    """MoE layers from Megatron's --moe-layer-freq: an int k (every k-th layer), a list of 0/1,
    or the string form '([0]*3+[1]*58)'. None: every layer."""
    if freq is None:
        return layers
    if isinstance(freq, int):
        return sum(1 for i in range(layers) if i % freq == 0)
    if isinstance(freq, (list, tuple)):
        return int(sum(freq))
    text = str(freq).strip()
    total = 0
    for part in text.strip("()").split("+"):
        part = part.strip()
        if "*" in part:
            items, times = part.rsplit("*", 1)
            values = [int(v) for v in items.strip("[] ").split(",") if v.strip()]
            total += sum(values) * int(times)
        elif part.strip("[] "):
            total += sum(int(v) for v in part.strip("[] ").split(","))
    if total <= 0 or total > layers:
        raise ValueError(f"megatron.--moe-layer-freq={freq!r}: expected an int, a 0/1 list or "
                         f"'([0]*a+[1]*b)' with at most {layers} MoE layers")
    return total


def step_flops(cfg) -> StepFlops:
    """Non-expert FLOPs per token of a validated run config (``cfg.megatron_value``): attention
    projections (MLA with q/kv LoRA ranks, or MHA/GQA), causal attention scores (half of s^2),
    dense MLP layers, shared experts, the router GEMM and the output logits; forward + backward =
    3 x forward (2 FLOPs per multiply-add). Embedding lookups and norms are left out."""
    mega = cfg.megatron_value
    H, layers, heads = mega("hidden-size"), mega("num-layers"), mega("num-attention-heads")
    for name, value in (("hidden-size", H), ("num-layers", layers), ("num-attention-heads", heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{cfg.source}: megatron.--{name}={value!r} must be a positive integer "
                             "for the step's FLOPs")
    seq = mega("seq-length") or 4096
    if mega("multi-latent-attention", False):
        q_rank, kv_rank = mega("q-lora-rank"), mega("kv-lora-rank") or 512
        qk, rope, v = mega("qk-head-dim") or 128, mega("qk-pos-emb-head-dim") or 64, mega("v-head-dim") or 128
        q = (H * q_rank + q_rank * heads * (qk + rope)) if q_rank else H * heads * (qk + rope)
        kv = H * (kv_rank + rope) + kv_rank * heads * (qk + v)
        proj = q + kv + heads * v * H
        score_dims = heads * (qk + rope + v)
    else:
        d = mega("kv-channels") or H // heads
        groups = mega("num-query-groups") if mega("group-query-attention", False) else heads
        proj = H * heads * d + 2 * H * (groups or heads) * d + heads * d * H
        score_dims = heads * 2 * d
    attention = 2 * proj + 2 * (seq / 2) * score_dims  # causal: each token sees s/2 keys on average
    mlp_mult = 3 if mega("swiglu", False) else 2
    dense_ffn = mega("ffn-hidden-size") or 4 * H
    shared = mega("moe-shared-expert-intermediate-size") or 0
    experts = mega("num-experts") or 0
    moe_layers = _moe_layer_count(mega("moe-layer-freq"), layers) if experts else 0
    per_moe = attention + 2 * mlp_mult * H * shared + 2 * H * experts
    per_dense = attention + 2 * mlp_mult * H * dense_ffn
    head = 2 * H * (mega("vocab-size") or 50257)
    return StepFlops(per_moe_layer=3 * per_moe, per_dense_layer=3 * per_dense, head=3 * head,
                     moe_layers=moe_layers, dense_layers=layers - moe_layers,
                     tensor_parallel=mega("tensor-model-parallel-size", 1) or 1)  # fmt: skip


@dataclass(frozen=True)
class StepTime:
    """One micro-batch's modeled forward+backward time per GPU over the whole model (seconds):
    ``serial`` (no comm/compute overlap: MoE comm + expert GEMMs + the rest) and ``overlap``
    (Megatron's --overlap-moe-expert-parallel-comm, ideal: each MoE layer's all-to-all hidden
    behind one micro-batch's whole layer compute, the layer taking max(comm, expert GEMMs +
    attention and shared parts)), and ``compute`` (no all-to-all at all: the physical limit)."""

    serial: float
    overlap: float
    compute: float
    moe_comm: float
    moe_expert: float
    rest: float


def step_time(comm_s: float, expert_s: float, flops: StepFlops, tokens_per_gpu: int,
              dense_tflops: float) -> StepTime:
    """``comm_s`` / ``expert_s``: one MoE layer's modeled all-to-all and busiest-GPU expert time
    (``cost.model.layer_time``); the rest is FLOPs / ``dense_tflops`` (per GPU, divided by TP)."""
    scale = tokens_per_gpu / (dense_tflops * 1e12 * flops.tensor_parallel)
    moe_rest = flops.per_moe_layer * scale
    other = (flops.dense_layers * flops.per_dense_layer + flops.head) * scale
    n = flops.moe_layers
    serial = n * (comm_s + expert_s + moe_rest) + other
    overlap = n * max(comm_s, expert_s + moe_rest) + other
    compute = n * (expert_s + moe_rest) + other
    return StepTime(serial=serial, overlap=overlap, compute=compute, moe_comm=n * comm_s,
                    moe_expert=n * expert_s, rest=n * moe_rest + other)  # fmt: skip


def measured_step_ratio(a2a_share: float, comm_ratio: float) -> float:
    """tau from a measured step: the exposed all-to-all share f of the baseline step scales by
    the modeled comm ratio, the rest stays: (1 - f) + f * comm_ratio."""
    if not 0 <= a2a_share < 1:
        raise ValueError(f"--a2a-share={a2a_share} must be in [0, 1): the exposed all-to-all "
                         "time over the whole step time, e.g. 0.3")
    return (1 - a2a_share) + a2a_share * comm_ratio


# --------------------------------------------------------------------------------------------
# Configurations: routing x transport, ranked by modeled time to quality
# --------------------------------------------------------------------------------------------
# What a configuration's routing is called in the study (benchmarks/quality.py) and who offers it.
ROUTINGS = {  # key: (label, study routing whose loss gap it takes, Megatron offers it)
    "topk": ("top-k", "topk", True),
    "topk_hier": ("top-k + our hierarchical placement", "topk", False),
    "megatron_nl_1": ("Megatron node-limited M=1", "megatron_nl_1", True),
    "megatron_nl_2": ("Megatron node-limited M=2", "megatron_nl_2", True),
    "node_M1_warmup120": ("ours node-anchored M=1 (120-step warm-up)", "node_M1_warmup120", False),
    "node_M2": ("ours node-anchored M=2", "node_M2", False),
    "megatron_nl_4": ("Megatron node-limited M=4", "megatron_nl_4", True),
    # The budgeted rule relaxed to 2 nodes (relaxing to all nodes lost more: docs/quality.md).
    **{f"node_B{b:g}_to2{tail}": (f"ours budgeted, {b:g} nodes per token, relaxed to 2{label}",
                                  f"node_B{b:g}_to2{tail}", False)
       for b in (1.25, 1.5, 1.75) for tail, label in (("", ""), ("_ramp", ", ramped"))},
}
# The same rules with Megatron's aux-loss map (c2r.aux_loss_map: preferred): the same rows, the
# loss of their own runs (docs/quality.md, 1,200 steps).
ROUTINGS.update({f"{key}_auxpref": (f"{label}, Megatron's aux-loss map", f"{study}_auxpref", False)
                 for key, (label, study, _) in list(ROUTINGS.items())
                 if key == "node_M2" or (key.startswith("node_B") and not key.endswith("_ramp"))})
TRANSPORTS = ("alltoall", "deepep", "hybridep", "two_level")
MEGATRON_TRANSPORTS = ("alltoall", "deepep", "hybridep")


def is_megatron(routing: str, transport: str) -> bool:
    """Megatron ships it today: its routing (top-k, node-limited) on its transports."""
    return ROUTINGS[routing][2] and transport in MEGATRON_TRANSPORTS


def rank_configurations(times: Dict[Tuple[str, str], StepTime], rho: Dict[str, float],
                        overlap: bool = False) -> List[Dict]:
    """Every (routing, transport) with a modeled step time and a token efficiency, as rows with
    the step time (serial or ideal-overlap), time to quality per step of the baseline's steps
    (step / rho) and the speedup over Megatron's best (the fastest Megatron configuration to the
    same loss) and over flex + DeepEP top-k; best first."""
    rows = []
    for (routing, transport), t in times.items():
        if routing not in rho:
            continue
        step = t.overlap if overlap else t.serial
        rows.append(dict(routing=routing, transport=transport, label=ROUTINGS[routing][0],
                         megatron=is_megatron(routing, transport), rho=rho[routing], step_s=step,
                         compute_s=t.compute, time_to_quality_s=step / rho[routing]))  # fmt: skip
    if not rows:
        return rows
    megatron = [r for r in rows if r["megatron"]]
    best_megatron = min(megatron, key=lambda r: r["time_to_quality_s"]) if megatron else None
    deepep_topk = next((r for r in rows if (r["routing"], r["transport"]) == ("topk", "deepep")), None)
    for r in rows:
        if best_megatron:
            r["speedup_vs_megatron_best"] = best_megatron["time_to_quality_s"] / r["time_to_quality_s"]
        if deepep_topk:
            r["speedup_vs_deepep_topk"] = deepep_topk["time_to_quality_s"] / r["time_to_quality_s"]
    rows.sort(key=lambda r: r["time_to_quality_s"])
    return rows


def study_rho(study: Dict, shape: str, routing: str, late: bool) -> Optional[float]:
    """rho of a study routing at a study shape: 1 for top-k (the reference), else from its
    documented loss gap on that shape's baseline fit (``late``: Kaplan's slope instead)."""
    entry = study["shapes"][shape]
    if routing == "topk":
        return 1.0
    gap = entry["gaps"].get(routing)
    if gap is None:
        return None
    if late:
        return late_slope_rho(gap["mean"] / 100)
    fit = entry.get("fit")
    if fit is None:
        return None
    return rho_from_gap(PowerLawFit(**fit), entry["steps"], gap["mean"] / 100)[0]


def nearest_study_shape(study: Dict, nodes: int) -> str:
    """The study shape whose virtual node count is nearest ``nodes`` (ties: the larger)."""
    return min(study["shapes"], key=lambda s: (abs(study["shapes"][s]["nodes"] - nodes),
                                               -study["shapes"][s]["nodes"]))  # fmt: skip


def load_study(path: Optional[str] = None) -> Dict:
    """The study's per-shape baseline fits and documented loss gaps (``study_quality.json``,
    written by ``benchmarks/time_to_quality.py``)."""
    from megatron_c2r.files import read_json_file

    path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), "study_quality.json")
    return read_json_file(path, "time-to-quality study data")


def routing_rules(nodes: int) -> Dict[str, "RoutingRule"]:
    """The cost model's rule for each configuration routing on an EP group of ``nodes`` nodes
    (rules that equal top-k there, M >= nodes, are left out; ``topk_hier`` routes as top-k:
    under uniform router scores a placement changes nothing)."""
    from megatron_c2r.cost.inputs import RoutingRule, node_anchored

    rules = {"topk": RoutingRule("top-k")}
    for m in (1, 2, 4):
        if m < nodes:
            rules[f"megatron_nl_{m}"] = RoutingRule(f"Megatron node-limited {m} of {nodes}", nodes, m,
                                                    anchored=False, limit_name="M")  # fmt: skip
    if nodes > 1:
        rules["node_M1_warmup120"] = node_anchored(nodes, 1)
    if nodes > 2:
        rules["node_M2"] = node_anchored(nodes, 2)
    for b in (1.25, 1.5, 1.75):  # the budgeted rule relaxed to 2 nodes (a ramp: the same counts)
        if nodes > 2:
            rules[f"node_B{b:g}_to2"] = node_anchored(nodes, 1, mean_budget=b, relax_to=2)
    return rules


def counts_source(routing: str) -> str:
    """The routing whose row counts (hence step times) ``routing`` has: a placement, a ramp and
    the aux-loss map change no row count at the end (top-k's / the rule's counts)."""
    return "topk" if routing == "topk_hier" else routing.removesuffix("_auxpref").removesuffix("_ramp")


def configuration_times(counts: Dict[str, "RoutingCounts"], params, flops: StepFlops,
                        tokens_per_gpu: int, dense_tflops: float) -> Dict[Tuple[str, str], StepTime]:
    """StepTime of every (routing, transport) from ``counts`` (keyed like ``routing_rules``;
    ``topk_hier`` reuses top-k's counts, a ``_ramp`` routing its budget's)."""
    from megatron_c2r.cost.model import layer_time

    out = {}
    for routing in ROUTINGS:
        source = counts_source(routing)
        if source not in counts:
            continue
        for transport in TRANSPORTS:
            t = layer_time(counts[source], transport, params, routing)
            out[routing, transport] = step_time(t.comm_s, t.compute_s, flops, tokens_per_gpu,
                                                dense_tflops)  # fmt: skip
    return out
