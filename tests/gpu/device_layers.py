"""Checks 2 and 3 of the device check (docs/device_check.md): one MoE layer's host syncs, and its
speed and memory against Megatron's alltoall MoE layer under the same routing.

Shape legend: T tokens, H hidden, E experts, K experts per token (top-k), F expert FFN size.

Both layers are built from the same Megatron MoE spec (TE grouped experts when transformer-engine
imports, else Megatron's local SequentialMLP) on Megatron's parallel state over a world of one
process (NCCL on CUDA, gloo on CPU; EP=1, so both dispatchers take their local path):

    ours       C2RMoELayer(dispatcher="dedup") + C2RRouter     (mode topk, or group)
    baseline   Megatron's MoELayer, alltoall dispatcher, with  TopKRouter        for top-k
                                                               C2RRouter(group)  for group
with ours' weights copied into the baseline, so the routing is the same (checked: equal routing
maps, outputs within bf16 rounding). On CPU the stock alltoall dispatcher and router need the
test-only patches of ``tests/megatron_cpu.py``; on a GPU without transformer-engine Megatron
0.16's router gating refers to an undefined ``te_general_gemm``, which ``cuda_shims`` defines as
None (Megatron's own "no TE" value) and reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
import traceback
import warnings
from typing import Callable, Dict, List, Optional
from unittest import mock

import torch

from tests.sync_audit import SyncAudit, megatron_alltoall_dtoh

# Budget of the node-aware issue's part 5 for the flat dedup dispatcher (per MoE layer).
SYNC_BUDGET = {"forward": 1, "backward": 0}


@dataclasses.dataclass(frozen=True)
class LayerShape:
    tokens: int  # T
    hidden: int  # H
    experts: int  # E
    topk: int  # K
    ffn: int  # F
    dtype: torch.dtype
    routing: str = "topk"  # "topk" | "group" (G groups of E/G experts, M=1 anchored)
    num_groups: int = 8

    def describe(self) -> dict:
        return dict(T=self.tokens, H=self.hidden, E=self.experts, k=self.topk, F=self.ffn,
                    dtype=str(self.dtype).replace("torch.", ""), routing=self.routing)  # fmt: skip


def cuda_shims() -> List[str]:
    """Define what Megatron 0.16 leaves undefined on a GPU without transformer-engine."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return []
    moe_utils.te_general_gemm = None
    return ["megatron.core.transformer.moe.moe_utils.te_general_gemm = None (no transformer-engine)"]


def platform(device: str):
    """The context the layers run in: the CPU oracle patches on CPU, nothing on CUDA."""
    if device == "cuda":
        return contextlib.nullcontext()
    from tests.megatron_cpu import megatron_cpu

    return megatron_cpu()


def _config(shape: LayerShape, device: str):
    import torch.nn.functional as F

    from megatron_c2r import compat
    from tests.megatron_cpu import moe_config

    return moe_config(
        hidden_size=shape.hidden, num_attention_heads=8, ffn_hidden_size=4 * shape.hidden,
        num_moe_experts=shape.experts, moe_router_topk=shape.topk, moe_ffn_hidden_size=shape.ffn,
        gated_linear_unit=True, activation_func=F.silu, moe_router_dtype="fp32",
        moe_aux_loss_coeff=1e-3, moe_grouped_gemm=compat.HAVE_TE,
        bf16=shape.dtype is torch.bfloat16, params_dtype=shape.dtype,
        use_cpu_initialization=device == "cpu",
    )  # fmt: skip


def build_pair(shape: LayerShape, device: str):
    """``(ours, baseline)`` MoE layers with identical weights, in train mode, on ``device``."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from megatron_c2r import compat
    from megatron_c2r.moe.options import C2ROptions
    from megatron_c2r.moe.spec_builders import apply_c2r_to_moe_spec
    from megatron_c2r.routing.config import C2RRouterConfig

    config = _config(shape, device)
    stock = get_moe_module_spec(use_te=compat.HAVE_TE, num_experts=shape.experts,
                                moe_grouped_gemm=compat.HAVE_TE)  # fmt: skip
    # Router defaults as users run them (collaboration tracker on, finite-logits check on).
    if shape.routing == "topk":
        router = C2RRouterConfig(mode="topk")
    else:
        router = C2RRouterConfig(mode="group", num_groups=shape.num_groups, max_groups=1)
    ours_spec = apply_c2r_to_moe_spec(stock, C2ROptions(router=router, dispatcher="dedup"))
    base_spec = stock
    if shape.routing != "topk":  # Megatron's dispatcher and layer class, our group rule
        base_spec = apply_c2r_to_moe_spec(stock, C2ROptions(router=router, dispatcher="megatron"))
    torch.manual_seed(0)
    ours = compat.build_from_spec(ours_spec, config=config, layer_number=1)
    baseline = compat.build_from_spec(base_spec, config=config, layer_number=1)
    result = baseline.load_state_dict(ours.state_dict(), strict=False)
    if result.missing_keys:
        raise RuntimeError(f"baseline layer lacks weights of ours: {result.missing_keys[:3]}")
    return ours.to(device).train(), baseline.to(device).train()


def make_inputs(shape: LayerShape, device: str):
    g = torch.Generator().manual_seed(1)
    x_TBH = torch.randn(shape.tokens, 1, shape.hidden, generator=g).to(device, shape.dtype)
    grad_TBH = torch.randn(shape.tokens, 1, shape.hidden, generator=g).to(device, shape.dtype)
    return x_TBH, grad_TBH


def forward(layer, x_TBH):
    for p in layer.parameters():
        p.grad = None
    out_TBH, _ = layer(x_TBH.detach().requires_grad_())
    return out_TBH


def step(layer, x_TBH, grad_TBH) -> None:
    forward(layer, x_TBH).backward(grad_TBH)


# --------------------------------------------------------------------------------------------
# Sync counting
# --------------------------------------------------------------------------------------------
def _site(stack) -> str:
    """``file:line`` of the innermost frame in megatron_c2r or megatron (else the innermost)."""
    frames = [f for f in stack if "warnings.py" not in f.filename and "device_layers" not in f.filename]
    ours = [f for f in frames if "megatron_c2r" in f.filename or "/megatron/" in f.filename]
    frame = (ours or frames or stack)[-1]
    path = frame.filename
    for marker in ("megatron_c2r/", "megatron/"):
        if marker in path:
            path = path[path.rindex(marker):]
            break
    return f"{path}:{frame.lineno}"


@contextlib.contextmanager
def cuda_sync_counter(sites: List[str]):
    """Record one site per synchronizing CUDA call (``torch.cuda.set_sync_debug_mode('warn')``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                sites.append(_site(traceback.extract_stack()))

        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)  # first: synchronize() below would count itself
            torch.cuda.synchronize()


@contextlib.contextmanager
def cpu_sync_counter(audit):
    """CPU stand-in: ``tests/sync_audit.SyncAudit`` (tracks which tensors a GPU run would hold
    on the device) with its model of Megatron's alltoall device-to-host copies."""
    from megatron.core.transformer.moe import token_dispatcher  # heavy: megatron.core

    cls = token_dispatcher.MoEAlltoAllTokenDispatcher
    with mock.patch.object(cls, "_maybe_dtoh_and_synchronize", megatron_alltoall_dtoh(audit)):
        with audit:
            yield


def count_syncs(layer, x_TBH, grad_TBH, device: str) -> dict:
    """Host syncs of one forward and one backward of ``layer`` (after one warm-up step)."""
    step(layer, x_TBH, grad_TBH)  # first call: lazy allocations and caches
    if device == "cuda":
        forward_sites: List[str] = []
        backward_sites: List[str] = []
        with cuda_sync_counter(forward_sites):
            out_TBH = forward(layer, x_TBH)
        with cuda_sync_counter(backward_sites):
            out_TBH.backward(grad_TBH)
    else:
        audit = SyncAudit().track(layer, x_TBH, grad_TBH)
        with cpu_sync_counter(audit):
            out_TBH = forward(layer, x_TBH)
            audit.phase = "backward"
            out_TBH.backward(grad_TBH)
        forward_sites = [op for phase, op in audit.events if phase == "forward"]
        backward_sites = [op for phase, op in audit.events if phase == "backward"]
    return dict(forward=len(forward_sites), backward=len(backward_sites),
                forward_sites=forward_sites, backward_sites=backward_sites)  # fmt: skip


def sync_audit(shape: LayerShape, device: str) -> dict:
    """Check 2: syncs per forward/backward of ours (against ``SYNC_BUDGET``) and the baseline."""
    with platform(device):
        ours, baseline = build_pair(shape, device)
        x_TBH, grad_TBH = make_inputs(shape, device)
        layers = {"c2r_dedup": count_syncs(ours, x_TBH, grad_TBH, device),
                  "megatron_alltoall": count_syncs(baseline, x_TBH, grad_TBH, device)}  # fmt: skip
    mine = layers["c2r_dedup"]
    within = mine["forward"] <= SYNC_BUDGET["forward"] and mine["backward"] <= SYNC_BUDGET["backward"]
    return dict(
        method="torch.cuda.set_sync_debug_mode('warn')" if device == "cuda"
        else "cpu stand-in: tests/sync_audit.SyncAudit (ops that block on an accelerator, on "
        "tensors a GPU run would hold on the device)",
        shape=shape.describe(), budget=dict(SYNC_BUDGET), layers=layers, within_budget=within,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Speed and memory
# --------------------------------------------------------------------------------------------
def _time_once(fn: Callable[[], None], device: str) -> float:
    """Milliseconds of ``fn`` (CUDA events on a GPU, wall clock on CPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - begin)


def _peak_mib(fn: Callable[[], None], device: str) -> Optional[float]:
    """Peak memory above what was allocated before ``fn`` (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def compare_layers(shape: LayerShape, device: str, reps: int, warmup: int) -> dict:
    """Check 3 for one shape: same routing, then interleaved timed fwd+bwd steps (ABBA...)."""
    with platform(device):
        ours, baseline = build_pair(shape, device)
        x_TBH, grad_TBH = make_inputs(shape, device)
        layers = {"c2r_dedup": ours, "megatron_alltoall": baseline}
        with torch.no_grad():
            _, map_ours = ours.router(x_TBH)
            _, map_base = baseline.router(x_TBH)
            out_ours, out_base = forward(ours, x_TBH), forward(baseline, x_TBH)
            rel_diff = float((out_ours.float() - out_base.float()).norm() / out_base.float().norm())
        for _ in range(warmup):
            for layer in layers.values():
                step(layer, x_TBH, grad_TBH)
        times: Dict[str, List[float]] = {name: [] for name in layers}
        for rep in range(reps):
            order = list(layers) if rep % 2 == 0 else list(layers)[::-1]
            for name in order:
                times[name].append(_time_once(lambda: step(layers[name], x_TBH, grad_TBH), device))
        peaks = {name: _peak_mib(lambda: step(layer, x_TBH, grad_TBH), device)
                 for name, layer in layers.items()}  # fmt: skip
        stats = ours.comm_stats
        rows = getattr(stats, "rows_dispatched", None)
        tokens = getattr(stats, "routed_tokens", None)
    ratios = [a / b for a, b in zip(times["c2r_dedup"], times["megatron_alltoall"])]
    del ours, baseline, layers
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(
        shape=shape.describe(),
        routing_maps_equal=bool(torch.equal(map_ours, map_base)),
        output_rel_diff=rel_diff,
        ms_c2r_dedup=statistics.median(times["c2r_dedup"]),
        ms_megatron_alltoall=statistics.median(times["megatron_alltoall"]),
        time_ratio_median=statistics.median(ratios),
        peak_mib_c2r_dedup=peaks["c2r_dedup"],
        peak_mib_megatron_alltoall=peaks["megatron_alltoall"],
        rows_per_token_c2r=(rows / tokens) if rows and tokens else None,
        reps=reps,
    )
