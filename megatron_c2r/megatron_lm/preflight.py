"""What our Megatron-LM entry refuses, and how it resumes a stock checkpoint, decided before
Megatron parses the command line (so a refusal is one line, before any process group or GPU).

Three questions, each a function of the argv (plus, for the last, the checkpoint's metadata on
disk); ``model_build_problem(argv)`` runs Megatron's argument defaults and every model-build check
that needs no GPU (``build_check``), the other two are pure:

``refusal(settings)``: settings under which Megatron-LM would not build our model. Checked on
the argv up front (``refusal_in_argv``) and again on the parsed args when the model is built
(``c2r_model_provider``), because Megatron-LM sets ``args.modelopt_enabled`` by itself when
``--load`` holds a ModelOpt checkpoint:

    --modelopt-enabled     the checkout's model_provider swaps our builder for ModelOpt's
                           (stock layers, no C2R) -- silently, so we stop
    --spec MODULE NAME     our builder makes the C2R block spec from the flags; the
                           ``megatron_c2r.specs`` presets are for plain ``pretrain_gpt.py``
    --use-legacy-models    legacy GPT has no MoE layers to put C2R in
    --yaml-cfg             Megatron's YAML config path builds the config without our flags

``resume_from_stock(argv)``: does ``--load`` hold a torch_dist checkpoint whose MoE routers have
no C2R state (a stock or ``--c2r-disable`` run)? Our routers add buffers (``expert_to_group``,
``top_t_lists``, ``constraint_active``, ``tracker.*``) that such a checkpoint lacks, and
Megatron's default ``--dist-ckpt-strictness assume_ok_unexpected`` then fails the load deep in
torch DCP. With ``log_unexpected`` (or ``log_all``/``ignore_all``) the load skips them (logged),
Megatron-LM's model load falls back to ``strict=False`` for exactly those buffers, and they
keep their initial values. Without one of those flags we stop with one line naming the flag.
The router schedule counts Megatron's iterations, which resume at the checkpoint's: a warm-up
that ended before that iteration ends at the first step. That is what group mode wants (the
stock run was the plain top-k warm-up), but c2r mode would derive its top-T lists from a
tracker that has counted one iteration, so there we stop and name the ``--c2r-warmup-steps``
value that gives the tracker a warm-up after the resume (an absolute iteration, so it holds
across later resumes too). Other checkpoint formats are not inspected (legacy ``torch`` loads
fall back to ``strict=False`` inside Megatron-LM by themselves).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from megatron_c2r.megatron_lm.flags import C2R_FLAGS
from megatron_c2r.routing.config import C2RRouterConfig

# (flag, args attribute, why it is refused and what to do instead)
_REFUSED = (
    (
        "--modelopt-enabled",
        "modelopt_enabled",
        "Megatron-LM's ModelOpt model provider would replace megatron_c2r's (no C2R layers; it is "
        "also set by itself when --load holds a ModelOpt checkpoint): drop the flag or load a "
        "non-ModelOpt checkpoint",
    ),
    (
        "--spec",
        "spec",
        "python -m megatron_c2r.megatron_lm builds the C2R block spec from the --c2r-* flags: "
        "remove it (the megatron_c2r.specs presets are for plain pretrain_gpt.py)",
    ),
    ("--use-legacy-models", "use_legacy_models", "legacy GPT models have no MoE layers: remove it"),
    (
        "--yaml-cfg",
        "yaml_cfg",
        "Megatron's YAML path ignores the --c2r-* flags: pass flags, or use megatron-c2r pretrain "
        "CONFIG.yaml",
    ),
)
# --dist-ckpt-strictness values that skip keys the checkpoint lacks instead of failing the load.
TOLERANT_STRICTNESS = ("log_unexpected", "log_all", "ignore_all")
_STOCK_FIX = "log_unexpected"
_MODE_FLAG, _WARMUP_FLAG = C2R_FLAGS["mode"][0], C2R_FLAGS["warmup_steps"][0]  # --c2r-mode, ...


def model_build_problem(argv: Sequence[str]) -> Optional[str]:
    """Why our model would not build from ``argv`` (one line), or None: Megatron's argument
    defaults, its ``TransformerConfig`` checks and ours, no GPU (``build_check``; imports
    megatron.core)."""
    from megatron_c2r.megatron_lm.build_check import model_build_problem as problem

    return problem(argv)


class UnsupportedSetting(ValueError):
    """A Megatron-LM setting our entry cannot serve; the message is one line naming the flag."""


def refusal(settings) -> Optional[str]:
    """The one-line reason ``settings`` (Megatron-LM's args, or ``parse_entry_argv``'s
    namespace) cannot build a C2R model, or None. Pure."""
    for flag, attribute, why in _REFUSED:
        value = getattr(settings, attribute, None)
        if value:
            shown = " ".join(value) if isinstance(value, (list, tuple)) else value
            return f"{flag}={shown!r} is not supported by megatron_c2r: {why}"
    return None


def parse_entry_argv(argv: Sequence[str]) -> argparse.Namespace:
    """The few Megatron-LM and ``--c2r-*`` flags these checks read, parsed the way Megatron's
    parser reads them (``allow_abbrev=False``); every other flag is left alone, and a malformed
    value gives the defaults (Megatron's parser then stops on it with its own message)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    for flag in ("--modelopt-enabled", "--use-legacy-models", "--c2r-disable", "--finetune"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--spec", nargs="*")
    for flag in ("--yaml-cfg", "--load", "--pretrained-checkpoint"):
        parser.add_argument(flag)
    parser.add_argument("--ckpt-step", type=int)
    parser.add_argument("--ckpt-format", default="torch_dist")
    parser.add_argument("--dist-ckpt-strictness", default="assume_ok_unexpected")
    defaults = C2RRouterConfig()
    parser.add_argument(_MODE_FLAG, dest="c2r_mode", default=defaults.mode)
    parser.add_argument(_WARMUP_FLAG, dest="c2r_warmup_steps", type=int, default=defaults.warmup_steps)
    try:
        known, _ = parser.parse_known_args(list(argv))
    except argparse.ArgumentError:  # a malformed value: Megatron's own parser reports it
        known, _ = parser.parse_known_args([])
    return known


def refusal_in_argv(argv: Sequence[str]) -> Optional[str]:
    """``refusal`` of the command line itself (before Megatron parses it)."""
    return refusal(parse_entry_argv(argv))


@dataclass(frozen=True)
class StockResume:
    """``--load`` holds MoE routers without C2R state at ``prefixes`` (e.g. ``decoder.layers.mlp.``);
    training resumes at Megatron iteration ``start_iteration``."""

    checkpoint_dir: str
    prefixes: Tuple[str, ...]
    start_iteration: int


def checkpoint_iteration_dir(load_dir: str, ckpt_step: Optional[int] = None) -> Optional[str]:
    """The directory Megatron-LM would load from ``load_dir`` (``iter_XXXXXXX`` or ``release``),
    or None when there is nothing to load yet (a fresh run whose --load equals --save)."""
    if ckpt_step is not None:
        path = os.path.join(load_dir, f"iter_{ckpt_step:07d}")
        return path if os.path.isdir(path) else None
    tracker = os.path.join(load_dir, "latest_checkpointed_iteration.txt")
    if not os.path.isfile(tracker):
        return None
    with open(tracker, encoding="utf-8") as handle:
        text = handle.read(64).strip()  # an integer or "release"; bounded read
    if text == "release":
        sub = "release"
    else:
        try:
            sub = f"iter_{int(text):07d}"
        except ValueError:
            raise UnsupportedSetting(
                f"--load {load_dir!r}: {tracker} holds {text!r}, not an iteration number or "
                "'release': fix or delete that file"
            ) from None
    path = os.path.join(load_dir, sub)
    return path if os.path.isdir(path) else None


def stock_router_prefixes(tensor_keys) -> Tuple[str, ...]:
    """Module prefixes whose ``router.weight`` is in the checkpoint without our
    ``router.constraint_active`` next to it (model keys only; optimizer keys are skipped). Pure."""
    keys = [k for k in tensor_keys if not k.startswith("optimizer.")]
    have = set(keys)
    prefixes = {k[: -len("router.weight")] for k in keys if k.endswith("router.weight")}
    return tuple(sorted(p for p in prefixes if f"{p}router.constraint_active" not in have))


def checkpoint_tensor_keys(checkpoint_dir: str):
    """ShardedTensor keys of a torch_dist checkpoint, from its metadata only (no tensor data).
    Imports megatron.core (heavy; only called when --load names an existing checkpoint)."""
    from megatron_c2r import compat  # (not Megatron's loader: it fails on 0.19.2 + torch 2.15)

    return compat.dist_checkpoint_tensor_keys(checkpoint_dir)


def resume_from_stock(argv: Sequence[str]) -> Optional[StockResume]:
    """What ``--load`` in ``argv`` holds (see the module docstring). Returns None when C2R is off,
    nothing is loaded, the format is not torch_dist or the routers already have C2R state;
    a ``StockResume`` when the strictness lets the load skip our buffers; raises
    ``UnsupportedSetting`` (one line naming ``--dist-ckpt-strictness``) otherwise."""
    args = parse_entry_argv(argv)
    if args.c2r_disable or args.ckpt_format != "torch_dist":
        return None
    checkpoint_dir = None
    for load_dir in (args.load, args.pretrained_checkpoint):  # Megatron-LM's fallback order
        if load_dir:
            checkpoint_dir = checkpoint_iteration_dir(load_dir, args.ckpt_step)
            if checkpoint_dir is not None:
                break
    if checkpoint_dir is None or not os.path.isfile(os.path.join(checkpoint_dir, "metadata.json")):
        return None
    prefixes = stock_router_prefixes(checkpoint_tensor_keys(checkpoint_dir))
    if not prefixes:
        return None
    if args.dist_ckpt_strictness not in TOLERANT_STRICTNESS:
        raise UnsupportedSetting(
            f"--load {checkpoint_dir!r} has MoE routers without C2R router state (a stock or "
            f"--c2r-disable checkpoint; e.g. {prefixes[0]}router.*) and --dist-ckpt-strictness="
            f"{args.dist_ckpt_strictness} fails on the missing keys: add --dist-ckpt-strictness "
            f"{_STOCK_FIX} (C2R router state then starts fresh)"
        )
    # Megatron-LM restarts the count at 0 for --finetune and release checkpoints.
    name = os.path.basename(os.path.normpath(checkpoint_dir))
    start = 0 if args.finetune or name == "release" else int(name[len("iter_"):])
    if args.c2r_mode == "c2r" and 0 < args.c2r_warmup_steps <= start:
        raise UnsupportedSetting(
            f"{_WARMUP_FLAG}={args.c2r_warmup_steps} ends before the resumed iteration {start} of "
            f"stock checkpoint {checkpoint_dir!r}, so {_MODE_FLAG} c2r would derive its top-T "
            "lists from a tracker that has counted one iteration: the warm-up counts Megatron's "
            f"iterations, set {_WARMUP_FLAG} {start}+N (e.g. {start + max(args.c2r_warmup_steps, 1)})"
        )
    return StockResume(checkpoint_dir=checkpoint_dir, prefixes=prefixes, start_iteration=start)
