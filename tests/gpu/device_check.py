"""The prepared device check: run it once when a GPU machine is lent (docs/device_check.md).

    bash tests/gpu/device_check.sh [--out DIR]        # finds megatron-core / Megatron-LM, then this
    python tests/gpu/device_check.py --out DIR [--cpu] [--experts 64 256] [--reps 20]

Four checks, one JSON report (``DIR/device_check.json``, written atomically) and a short summary
(``DIR/device_check_summary.txt``, also printed):

    1 environment       torch / CUDA / transformer-engine / megatron-core versions, GPU name
    2 sync_audit        one C2RMoELayer forward+backward (flat dedup, EP=1 local path): host
                        syncs counted under torch.cuda.set_sync_debug_mode against the budget
                        (<= 1 per forward, 0 in backward); Megatron's alltoall layer alongside
    3 speed_memory      ours vs Megatron's alltoall MoE layer, same routing, T=4096, H=4096,
                        E in --experts, k=8, bf16, router fp32: median CUDA-event time of
                        interleaved fwd+bwd repetitions and peak memory, top-k and group routing
    4 entry_arguments   the entry run's argv through our preflight and --c2r-* parser (anywhere)
      entry_path        a tiny MoE GPT through python -m megatron_c2r.megatron_lm on one GPU
                        (needs CUDA and MEGATRON_LM_PATH; see tests/gpu/device_entry.py)

Without CUDA (or with ``--cpu``) it runs the same code on CPU at a smoke shape over a gloo world
of one: check 2 counts with the CPU model of the syncs (``tests/sync_audit.py``), check 3 gives
no timings worth reading, ``entry_path`` is skipped; every skip is listed with its reason. Exit
status: 0 when no check failed or errored, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform as host
import socket
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# torch, megatron.core and the check modules are imported in main(), after the arguments are
# parsed (heavy: a bad flag answers in a second), as ``torch``, ``device_entry``, ``device_layers``.
torch = device_entry = device_layers = None

CHECKS = ("environment", "sync_audit", "speed_memory", "entry_arguments", "entry_path")
VERDICTS = ("pass", "fail", "error", "skipped", "info")  # info: ran, measures, no verdict


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "device_check_out"), help="report directory")
    p.add_argument("--cpu", action="store_true", help="CPU mode even if CUDA is available")
    p.add_argument("--experts", type=int, nargs="+", default=[64, 256], help="E for check 3")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=1024, help="expert FFN size F (SwiGLU)")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per layer")
    p.add_argument("--warmup", type=int, default=3)
    # Time plan on one H200 (340 s in all, DEVICE_CHECK_TIMEOUT; the device call allows 600 s, so
    # a rerun fits the 15-minute lease): ~20 s imports, ~10 s sync audit, check 3 stops starting
    # shapes at --budget-s, the two entry runs (cold start: imports, torchrun, first-step setup)
    # get --entry-timeout-s together. Not yet timed on a GPU.
    p.add_argument("--budget-s", type=float, default=90, help="no new check-3 shape after this")
    p.add_argument("--entry-timeout-s", type=float, default=180, help="both entry runs together")
    p.add_argument("--skip", nargs="*", default=[], choices=CHECKS, help="checks not to run")
    return p.parse_args(argv)


def environment(device: str) -> dict:
    from megatron_c2r import compat

    te = compat.transformer_engine
    import megatron.core

    env = dict(
        python=host.python_version(), host=socket.gethostname(), torch=torch.__version__,
        cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(), device=device,
        transformer_engine=getattr(te, "__version__", None) if te is not None else None,
        apex=compat.HAVE_APEX, megatron_core=compat.MCORE_VERSION,
        megatron_core_path=os.path.dirname(megatron.core.__file__),
        megatron_lm=device_entry.find_checkout(os.environ.get("MEGATRON_LM_PATH")),
    )  # fmt: skip
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   sm_count=props.multi_processor_count,
                   nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl))  # fmt: skip
    return env


def init_world(device: str) -> None:
    """A world of one process with Megatron's parallel state (EP=TP=1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from tests.dist_pool import _free_port

    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1,
                                init_method=f"tcp://127.0.0.1:{_free_port()}")  # fmt: skip
    parallel_state.initialize_model_parallel()
    if device == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(0)


def layer_shapes(args, device: str):
    """(sync-audit shape, speed shapes) for this device."""
    from tests.gpu.device_layers import LayerShape

    if device == "cuda":
        audit = LayerShape(1024, 1024, 64, 8, 512, torch.bfloat16)
        speed = [LayerShape(args.tokens, args.hidden, e, args.topk, args.ffn, torch.bfloat16, r)
                 for e in args.experts for r in ("topk", "group")]  # fmt: skip
        return audit, speed
    smoke = LayerShape(64, 64, 16, 2, 32, torch.float32)  # CI: the same code path, seconds
    return smoke, [smoke, LayerShape(64, 64, 16, 2, 32, torch.float32, "group")]


def run_checks(args, device: str, report: dict) -> None:
    checks, skipped = report["checks"], report["skipped"]
    start = time.monotonic()

    def run(name: str, fn: Callable[[], dict], verdict: Callable[[dict], str]) -> None:
        if name in args.skip:
            return skip(name, "--skip")
        began = time.monotonic()
        try:
            result = fn()
            status = verdict(result)
        except Exception as exc:  # a check that breaks must not hide the others
            result = dict(error=f"{type(exc).__name__}: {exc}".splitlines()[0],
                          traceback=traceback.format_exc()[-4000:])  # fmt: skip
            status = "error"
        checks[name] = dict(status=status, seconds=round(time.monotonic() - began, 2), **result)

    def skip(name: str, reason: str) -> None:
        checks[name] = dict(status="skipped", reason=reason)
        skipped.append(dict(check=name, reason=reason))

    run("environment", lambda: environment(device), lambda r: "info")
    shims = device_layers.cuda_shims() if device == "cuda" else []
    report["shims"] = shims
    audit_shape, speed_shapes = layer_shapes(args, device)
    run("sync_audit", lambda: device_layers.sync_audit(audit_shape, device),
        lambda r: "pass" if r["within_budget"] else "fail")
    if device != "cuda" and "sync_audit" not in args.skip:
        skipped.append(dict(check="sync_audit", reason="CUDA's sync debug mode needs CUDA (counted "
                            "with the CPU model tests/sync_audit.py instead)"))  # fmt: skip

    def speed() -> dict:
        results, left_out = [], []
        for shape in speed_shapes:
            if time.monotonic() - start > args.budget_s:
                left_out.append(shape.describe())
                continue
            reps = args.reps if device == "cuda" else 3
            results.append(device_layers.compare_layers(shape, device, reps, args.warmup))
        return dict(smoke=device != "cuda", results=results, left_out_for_time=left_out)

    tolerance = 2e-2 if device == "cuda" else 1e-5  # bf16 on GPU, fp32 smoke on CPU
    run("speed_memory", speed, lambda r: "pass" if r["results"] and all(
        x["routing_maps_equal"] and x["output_rel_diff"] < tolerance for x in r["results"]
    ) else "fail")  # fmt: skip
    if device != "cuda" and "speed_memory" not in args.skip:
        skipped.append(dict(check="speed_memory", reason="full shape and CUDA-event timing need "
                                                         "CUDA (ran a CPU smoke shape)"))  # fmt: skip
    use_te = bool(checks["environment"].get("transformer_engine"))
    run("entry_arguments", lambda: device_entry.entry_arguments(use_te),
        lambda r: "pass" if all(r["checks"].values()) else "fail")
    checkout = device_entry.find_checkout(os.environ.get("MEGATRON_LM_PATH"))
    if device != "cuda":
        skip("entry_path", "needs CUDA (Megatron-LM's training loop)")
    elif checkout is None:
        skip("entry_path", "no Megatron-LM checkout: set MEGATRON_LM_PATH to a clone with "
                           "pretrain_gpt.py (tag core_v0.16.1 or newer)")  # fmt: skip
    else:
        run("entry_path", lambda: device_entry.entry_path(checkout, args.out, use_te,
                                                          args.entry_timeout_s),
            lambda r: "pass" if all(r["checks"].values()) else "fail")  # fmt: skip


def summary_lines(report: dict) -> list:
    env = report["checks"].get("environment", {})
    lines = [
        f"megatron-c2r device check ({report['mode']}): "
        f"{env.get('gpu') or 'no GPU'}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
        f"TE {env.get('transformer_engine')}, megatron-core {env.get('megatron_core')}, "
        f"Megatron-LM {env.get('megatron_lm')}",
    ]
    for name in CHECKS:
        check = report["checks"].get(name)
        if check is None:
            continue
        line = f"  {name:16s} {check['status']:8s}"
        if name == "sync_audit" and "layers" in check:
            ours, theirs = check["layers"]["c2r_dedup"], check["layers"]["megatron_alltoall"]
            line += (f" ours fwd {ours['forward']} bwd {ours['backward']} (budget "
                     f"{check['budget']['forward']}/{check['budget']['backward']}), megatron fwd "
                     f"{theirs['forward']} bwd {theirs['backward']}")  # fmt: skip
            if report["mode"] != "cuda":
                line += " [CPU model of the syncs]"
        if name == "speed_memory" and check.get("results"):
            line += " " + "; ".join(
                f"E={r['shape']['E']} {r['shape']['routing']}: {r['time_ratio_median']:.2f}x time, "
                f"{r['ms_c2r_dedup']:.1f} vs {r['ms_megatron_alltoall']:.1f} ms"
                + (f", peak {r['peak_mib_c2r_dedup']:.0f} vs {r['peak_mib_megatron_alltoall']:.0f} MiB"
                   if r["peak_mib_c2r_dedup"] is not None else "")
                for r in check["results"]
            )  # fmt: skip
        if "checks" in check:
            failed = [k for k, ok in check["checks"].items() if not ok]
            line += f" failed: {', '.join(failed)}" if failed else f" {len(check['checks'])} ok"
        if check["status"] in ("error", "skipped"):
            line += f" {check.get('error') or check.get('reason')}"
        lines.append(line)
    for item in report["skipped"]:
        lines.append(f"  skipped: {item['check']}: {item['reason']}")
    lines.append(f"  wall {report['wall_s']:.0f} s; report {report['report_path']}")
    return lines


def write_atomically(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
        handle.write(text)
        temp = handle.name
    os.replace(temp, path)


def main(argv=None) -> int:
    global torch, device_entry, device_layers
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import torch

    from tests.gpu import device_entry, device_layers
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    began = time.monotonic()
    report: Dict = dict(
        schema=1, mode=device, created=datetime.datetime.now().isoformat(timespec="seconds"),
        args=vars(args), checks={}, skipped=[],
        report_path=os.path.join(os.path.abspath(args.out), "device_check.json"),
    )  # fmt: skip
    init_world(device)
    run_checks(args, device, report)
    report["failed"] = [n for n, c in report["checks"].items() if c["status"] in ("fail", "error")]
    report["wall_s"] = round(time.monotonic() - began, 1)
    report["summary"] = summary_lines(report)
    write_atomically(report["report_path"], json.dumps(report, indent=2, default=str) + "\n")
    write_atomically(os.path.join(args.out, "device_check_summary.txt"), "\n".join(report["summary"]) + "\n")
    print("\n".join(report["summary"]), flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
