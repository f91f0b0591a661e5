"""Check 4 of the device check (docs/device_check.md): a tiny MoE GPT through our Megatron-LM
entry on one GPU, and the argument checks that run anywhere.

    entry_arguments(...)  every machine: the argv the GPU run uses passes our preflight and our
                          --c2r-* parser, and the refusals fire on --modelopt-enabled / --spec
    entry_path(...)       CUDA + a Megatron-LM checkout: mock data, bf16, the distributed
                          optimizer, --recompute-modules moe, c2r mode with a 2-step warm-up;
                          run 1 trains iterations 1-4 and saves at 4, run 2 resumes to 8 and saves

What entry_path checks, from the logs and from the two torch_dist checkpoints:
    runs_ok           both torchrun processes exit 0
    metrics_logged    the ``moe/c2r`` console line appears in both runs
    routers_activate  constraint_active is 0 on the first logged iteration, 1 on the last
    resumed_at_4      run 2 says it loaded the checkpoint at iteration 4
    state_saved       every router's constraint_active is True in the iteration-4 checkpoint
    state_restored    run 2 continued the saved state: the same top-T lists at iteration 8 (not
                      re-derived) and twice the iteration-4 token count
and one observation, reported but not a verdict: ``tracker_tokens_per_expected`` = tokens the
tracker counted by iteration 4 / (4 x global batch x seq). 1.0 means each token was counted
once; 2.0 means the MoE recompute's second forward (run in backward with grad enabled) counted
it again, which scales every count alike (the top-T lists do not change) but not the token total.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ, GLOBAL_BATCH, MICRO_BATCH, SAVE_AT, RESUME_TO, WARMUP = 128, 4, 2, 4, 8, 2
TOKENS_PER_ITERATION = SEQ * GLOBAL_BATCH  # one GPU: every token of the global batch is local


def entry_argv(save_dir: str, train_iters: int, use_te: bool) -> List[str]:
    """pretrain_gpt.py flags + ours for the tiny model (one GPU, mock data)."""
    argv = [
        "--num-layers", "2", "--hidden-size", "256", "--num-attention-heads", "4",
        "--ffn-hidden-size", "512", "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ),
        "--micro-batch-size", str(MICRO_BATCH), "--global-batch-size", str(GLOBAL_BATCH),
        "--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "256",
        "--moe-token-dispatcher-type", "alltoall", "--moe-router-load-balancing-type", "aux_loss",
        "--moe-aux-loss-coeff", "0.01", "--moe-router-dtype", "fp32",
        "--bf16", "--use-distributed-optimizer",
        "--recompute-granularity", "selective", "--recompute-modules", "moe",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024",
        "--lr", "1e-4", "--lr-decay-style", "constant", "--train-iters", str(train_iters),
        "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
        "--save", save_dir, "--load", save_dir, "--save-interval", str(SAVE_AT),
        "--ckpt-format", "torch_dist", "--distributed-backend", "nccl", "--seed", "1234",
        "--c2r-mode", "c2r", "--c2r-top-t", "3", "--c2r-warmup-steps", str(WARMUP),
        "--c2r-dispatcher", "dedup",
    ]  # fmt: skip
    if not use_te:  # Megatron's local modules; its fused weight-gradient kernel needs apex/TE
        argv += ["--transformer-impl", "local", "--no-gradient-accumulation-fusion"]
    return argv


def entry_arguments(use_te: bool) -> dict:
    """The GPU run's argv through our preflight and --c2r-* parser (no Megatron-LM needed)."""
    from megatron_c2r.megatron_lm import preflight
    from megatron_c2r.megatron_lm.arguments import add_c2r_args, c2r_options_from_args

    argv = entry_argv(os.path.join(ROOT, "does-not-exist"), RESUME_TO, use_te)
    options = c2r_options_from_args(add_c2r_args(argparse.ArgumentParser()).parse_known_args(argv)[0])
    checks = {
        "argv_accepted": preflight.refusal_in_argv(argv) is None,
        "fresh_run_needs_no_strictness": preflight.resume_from_stock(argv) is None,
        "model_builds": preflight.model_build_problem(argv) is None,  # what the entry checks first
        "c2r_flags_parse": options.router.mode == "c2r" and options.router.warmup_steps == WARMUP,
        "modelopt_refused": bool(preflight.refusal_in_argv([*argv, "--modelopt-enabled"])),
        "spec_refused": bool(preflight.refusal_in_argv([*argv, "--spec", "megatron_c2r.specs", "x"])),
    }
    return dict(checks=checks, options=str(options), argv=argv)


def router_state(checkpoint_dir: str) -> Dict[str, dict]:
    """Per router family (key prefix): constraint_active, tracker token totals per layer and the
    top-T lists, read from a torch_dist checkpoint with megatron.core's plain-tensor loader
    (needs torch.distributed initialised; a world of one is enough)."""
    from megatron.core import dist_checkpointing

    tensors = dist_checkpointing.load_plain_tensors(checkpoint_dir)
    state: Dict[str, dict] = {}
    for key, value in tensors.items():
        match = re.match(r"^(?!optimizer\.)(.*router\.)(constraint_active|top_t_lists|tracker\.tokens|"
                         r"tracker\.pending_tokens)$", key)  # fmt: skip
        if match:
            state.setdefault(match.group(1), {})[match.group(2)] = value.cpu()
    out = {}
    for prefix, found in state.items():
        tokens = found["tracker.tokens"] + found["tracker.pending_tokens"]  # [layers] or []
        out[prefix] = dict(
            constraint_active=[bool(v) for v in found["constraint_active"].flatten()],
            tracker_tokens=[int(v) for v in tokens.flatten()],
            top_t_lists=found.get("top_t_lists"),
        )
    return out


def metric_values(log: str, metric: str) -> List[float]:
    """Values of ``metric`` on the ``moe/c2r`` console lines, in order."""
    pattern = re.compile(rf"moe/c2r .*?\b{re.escape(metric)} ([-+0-9.eE]+)")
    return [float(m.group(1)) for m in pattern.finditer(log)]


def _run(argv: List[str], env: dict, log_path: str, timeout_s: float) -> int:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "1", "-m", "megatron_c2r.megatron_lm", *argv]  # fmt: skip
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        try:
            return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  cwd=ROOT, timeout=timeout_s).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            return 124


def entry_path(checkout: str, out_dir: str, use_te: bool, timeout_s: float) -> dict:
    """Check 4 (see the module docstring). Returns the checks and what they saw."""
    save_dir = os.path.join(out_dir, "entry_ckpt")
    env = dict(os.environ, MEGATRON_LM_PATH=checkout, CUDA_DEVICE_MAX_CONNECTIONS="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    logs, codes = {}, {}
    for name, iters in (("run1", SAVE_AT), ("run2", RESUME_TO)):
        path = os.path.join(out_dir, f"entry_{name}.log")
        codes[name] = _run(entry_argv(save_dir, iters, use_te), env, path, timeout_s / 2)
        logs[name] = open(path, errors="replace").read()
        if codes[name]:
            break
    seen = dict(exit_codes=codes, log_tail={k: v[-3000:] for k, v in logs.items()})
    checks = {"runs_ok": all(c == 0 for c in codes.values()) and len(codes) == 2}
    if not checks["runs_ok"]:
        return dict(checks=checks, seen=seen)
    active = metric_values(logs["run1"], "constraint_active")
    checks["metrics_logged"] = bool(active) and bool(metric_values(logs["run2"], "constraint_active"))
    checks["routers_activate"] = bool(active) and active[0] == 0.0 and active[-1] == 1.0
    checks["resumed_at_4"] = f"at iteration {SAVE_AT}" in logs["run2"]
    at4 = router_state(os.path.join(save_dir, f"iter_{SAVE_AT:07d}"))
    at8 = router_state(os.path.join(save_dir, f"iter_{RESUME_TO:07d}"))
    expected = SAVE_AT * TOKENS_PER_ITERATION
    checks["state_saved"] = bool(at4) and all(all(s["constraint_active"]) for s in at4.values())
    checks["state_restored"] = bool(at8) and all(
        at8[p]["tracker_tokens"] == [2 * t for t in at4[p]["tracker_tokens"]]
        and _same(at8[p]["top_t_lists"], at4[p]["top_t_lists"])
        for p in at4
    )
    counted = [t for s in at4.values() for t in s["tracker_tokens"]]
    seen.update(
        constraint_active_logged=active,
        tracker_tokens_per_expected=sorted({t / expected for t in counted}),
        tracker_tokens={"at_4": {p: s["tracker_tokens"] for p, s in at4.items()},
                        "at_8": {p: s["tracker_tokens"] for p, s in at8.items()}},  # fmt: skip
    )
    return dict(checks=checks, seen=seen)


def _same(a, b) -> bool:
    import torch

    return a is not None and b is not None and torch.equal(a, b)


def find_checkout(path: Optional[str]) -> Optional[str]:
    """``path`` if it is a Megatron-LM checkout (has pretrain_gpt.py), else None."""
    if path and os.path.isfile(os.path.join(path, "pretrain_gpt.py")):
        return os.path.abspath(path)
    return None
