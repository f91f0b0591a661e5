"""Every difference between Megatron-core versions lives here, and nowhere else.

Supported: megatron-core 0.16.1 (the newest wheel for Python 3.11, tested in CI) through 0.20
(NGC PyTorch images, Python 3.12). Differences are feature-detected with ``hasattr``/imports rather
than version-string comparisons, so a backport or a dev build does the right thing.

What differs, and where we handle it:
    optional GPU dependencies      HAVE_TE / HAVE_APEX (a half-installed TE raises RuntimeError)
    MoE layer spec shape           ModuleSpec (0.16/0.17) vs functools.partial (0.18+):
                                   moe_submodules(), replace_moe_submodules()
    per-layer metric tracker       save_to_aux_losses_tracker (0.16/0.17) vs MoEMetricsTracker
                                   (0.18+): record_router_metric()
    default process groups         get_default_pg_collection() (moved between modules)
    pretrain() signature           run_megatron_pretrain(): 0.16/0.17 parse inside pretrain();
                                   0.18+ take a cfg_container built from parsed args
    constructor keywords           supported_kwargs() (GPTModel's vp_stage, pg_collection, ...)
    transformer layer spec shape   layer_submodules(), replace_layer_submodules()
    torch_dist save on CPU         save_dist_checkpoint(): 0.16's strategy is async-only (CUDA
                                   sync, psutil); offline tools write through torch DCP directly
    argument parsing and defaults  megatron_argument_parser() (megatron.training from 0.17),
                                   apply_megatron_arg_defaults(), transformer_config_from_args()
    flex token dispatcher          flex_backends() (ncclep from 0.19), flex_problem() (what the
                                   installed flex refuses at build), flex_token_indices()
                                   (its own (routing_map, probs) -> per-token expert ids)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
from typing import Any, Optional

import torch


def _optional_import(name: str):
    """Import ``name`` or return None. Catches more than ImportError on purpose: a
    transformer-engine whose CUDA libraries are missing raises RuntimeError or OSError at import."""
    try:
        return importlib.import_module(name)
    except (ImportError, RuntimeError, OSError, AttributeError):
        return None


transformer_engine = _optional_import("transformer_engine")
HAVE_TE = transformer_engine is not None
HAVE_APEX = _optional_import("apex.normalization") is not None  # NVIDIA apex, not PyPI's "apex"

import megatron.core  # noqa: E402  (after the defensive TE import: mcore probes TE itself)

MCORE_VERSION: str = getattr(megatron.core, "__version__", "unknown")


# --------------------------------------------------------------------------------------------
# Process groups
# --------------------------------------------------------------------------------------------
def get_default_pg_collection():
    """Megatron's default MoE process-group collection (from parallel_state)."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "get_default_pg_collection"):
        return moe_utils.get_default_pg_collection()
    from megatron.core.process_groups_config import ProcessGroupCollection  # pragma: no cover

    return ProcessGroupCollection.use_mpu_process_groups()  # pragma: no cover


# --------------------------------------------------------------------------------------------
# MoE layer spec shape
# --------------------------------------------------------------------------------------------
def is_partial_spec(spec: Any) -> bool:
    """True for the 0.18+ shape ``functools.partial(MoELayer, submodules=...)``."""
    return isinstance(spec, functools.partial)


def moe_layer_class(spec: Any) -> type:
    """The module class of an MoE spec in either shape."""
    if is_partial_spec(spec):
        return spec.func
    return spec.module


def moe_submodules(spec: Any):
    """``MoESubmodules`` of an MoE spec in either shape."""
    if is_partial_spec(spec):
        return spec.keywords["submodules"]
    return spec.submodules


def build_from_spec(spec: Any, **kwargs):
    """Build a module from a layer spec in either shape: ``functools.partial`` specs (0.18+) are
    called, ``ModuleSpec``s go through Megatron's ``build_module``."""
    if is_partial_spec(spec):
        return spec(**kwargs)
    from megatron.core.transformer.spec_utils import build_module

    return build_module(spec, **kwargs)


def replace_moe_submodules(spec: Any, *, module: Optional[type] = None, **changes):
    """A copy of an MoE spec with ``MoESubmodules`` fields replaced (``router=...``) and
    optionally the layer class replaced; the spec's shape is preserved."""
    submodules = dataclasses.replace(moe_submodules(spec), **changes)
    if is_partial_spec(spec):
        keywords = dict(spec.keywords, submodules=submodules)
        return functools.partial(module or spec.func, *spec.args, **keywords)
    return dataclasses.replace(spec, module=module or spec.module, submodules=submodules)


# --------------------------------------------------------------------------------------------
# Router metrics (Megatron's per-layer tracker)
# --------------------------------------------------------------------------------------------
def record_router_metric(
    name: str,
    value: torch.Tensor,
    layer_number: Optional[int],
    num_layers: int,
    reduce_group: Optional[torch.distributed.ProcessGroup] = None,
) -> None:
    """Record a per-layer scalar in Megatron's MoE tracker so the stock training loop can log it.

    0.16/0.17: ``moe_utils.save_to_aux_losses_tracker``. 0.18+: ``MoEMetricsTracker.record``
    (the old function stays as a deprecated shim there; we prefer the new owner when present).
    """
    from megatron.core.transformer.moe import moe_utils

    tracker_cls = getattr(moe_utils, "MoEMetricsTracker", None)
    if tracker_cls is not None and hasattr(tracker_cls, "record"):  # pragma: no cover (0.18+)
        record = tracker_cls.record
        params = inspect.signature(record).parameters
        kwargs = {"reduce_group": reduce_group} if "reduce_group" in params else {}
        record(name, value, layer_number, num_layers, **kwargs)
        return
    moe_utils.save_to_aux_losses_tracker(
        name, value, layer_number, num_layers, reduce_group=reduce_group
    )


# --------------------------------------------------------------------------------------------
# Building an MoELayer subclass with its own token dispatcher
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def cheap_stock_dispatcher(config):
    """While active, ``MoELayer.__init__`` builds the stock *allgather* dispatcher (cheap, CPU-safe)
    whatever ``config.moe_token_dispatcher_type`` says, so a subclass can replace it afterwards.

    Needed because 0.16-0.20 pick the dispatcher from a fixed string list inside ``__init__`` and
    the alltoall/flex ones touch CUDA (streams, DeepEP buffers) on construction. The field is
    restored on exit, also on error.
    """
    original = config.moe_token_dispatcher_type
    config.moe_token_dispatcher_type = "allgather"
    try:
        yield
    finally:
        config.moe_token_dispatcher_type = original


def with_moe_layer_params(spec: Any, module: type, **params):
    """A copy of an MoE spec that builds ``module`` with extra constructor keywords ``params``:
    ``ModuleSpec.params`` (0.16/0.17) or the partial's keywords (0.18+); submodules kept."""
    if is_partial_spec(spec):
        return functools.partial(module, *spec.args, **dict(spec.keywords, **params))
    return dataclasses.replace(spec, module=module, params=dict(spec.params or {}, **params))


# --------------------------------------------------------------------------------------------
# Transformer layer specs (the layer itself stays a ModuleSpec through 0.20; accept both shapes)
# --------------------------------------------------------------------------------------------
def layer_submodules(spec: Any):
    """``TransformerLayerSubmodules`` of a layer spec (ModuleSpec, or a partial if one appears)."""
    if is_partial_spec(spec):  # pragma: no cover (not produced by 0.16-0.20)
        return spec.keywords.get("submodules")
    return getattr(spec, "submodules", None)


def replace_layer_submodules(spec: Any, **changes):
    """A copy of a layer spec with ``TransformerLayerSubmodules`` fields replaced (``mlp=...``)."""
    submodules = dataclasses.replace(layer_submodules(spec), **changes)
    if is_partial_spec(spec):  # pragma: no cover
        return functools.partial(spec.func, *spec.args, **dict(spec.keywords, submodules=submodules))
    return dataclasses.replace(spec, submodules=submodules)


# --------------------------------------------------------------------------------------------
# Megatron-LM's pretrain() (lives in a Megatron-LM checkout, not in the 0.16 wheel)
# --------------------------------------------------------------------------------------------
def run_megatron_pretrain(
    *,
    train_valid_test_dataset_provider,
    model_provider,
    model_type,
    forward_step_func,
    extra_args_provider=None,
    args_defaults: Optional[dict] = None,
    **optional,
):
    """Call ``megatron.training.pretrain`` with whichever signature the checkout has.

    0.16/0.17: ``pretrain(datasets, model_provider, model_type, forward_step,
    extra_args_provider=..., args_defaults=..., ...)`` parses the command line itself.
    0.18+: ``pretrain(cfg_container, datasets, ..., model_provider=..., ...)``; the caller parses
    first with ``arguments.parse_and_validate_args(extra_args_provider, args_defaults=...)`` and
    converts with ``argument_utils.pretrain_cfg_container_from_args(args)``. Feature-detected by
    the ``cfg_container`` parameter. ``optional`` keywords (``store``, ``get_embedding_ranks``...)
    are passed only when this ``pretrain`` accepts them.
    """
    from megatron.training import training

    pretrain = training.pretrain
    params = inspect.signature(pretrain).parameters
    kwargs = {k: v for k, v in optional.items() if k in params and v is not None}
    kwargs.update(
        train_valid_test_dataset_provider=train_valid_test_dataset_provider,
        model_provider=model_provider,
        model_type=model_type,
        forward_step_func=forward_step_func,
    )
    if "cfg_container" not in params:
        return pretrain(
            extra_args_provider=extra_args_provider, args_defaults=args_defaults or {}, **kwargs
        )
    from megatron.training.argument_utils import pretrain_cfg_container_from_args  # pragma: no cover
    from megatron.training.arguments import parse_and_validate_args  # pragma: no cover

    args = parse_and_validate_args(  # pragma: no cover (0.18+)
        extra_args_provider=extra_args_provider, args_defaults=args_defaults or {}
    )
    return pretrain(pretrain_cfg_container_from_args(args), **kwargs)  # pragma: no cover


def supported_kwargs(fn: Any, kwargs: dict) -> dict:
    """The subset of ``kwargs`` that ``fn`` (a function or class) accepts: constructor keywords
    such as ``GPTModel(vp_stage=..., pg_collection=...)`` appeared across releases."""
    target = fn.__init__ if isinstance(fn, type) else fn
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


# --------------------------------------------------------------------------------------------
# torch_dist checkpoint saving from one CPU process (offline tools)
# --------------------------------------------------------------------------------------------
def save_dist_checkpoint(sharded_state_dict: dict, checkpoint_dir: str) -> None:
    """``dist_checkpointing.save`` in the torch_dist format, synchronously, usable on CPU.

    0.16's default torch_dist strategy always takes its async path: ``torch.cuda.synchronize()``
    in ``preload_tensors`` and forked writer processes that need psutil. Offline tools (the
    checkpoint converter) run on CPU, so when the strategy's building blocks exist we write the
    same PyTorch-DCP layout through torch's synchronous ``FileSystemWriter`` with Megatron's own
    save planner; otherwise (layout changed upstream) we fall back to the stock call.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import torch as mtorch

    needed = ("TorchDistSaveShardedStrategy", "_replace_state_dict_keys_with_sharded_keys",
              "mcore_to_pyt_state_dict", "MCoreSavePlanner")
    if not all(hasattr(mtorch, name) for name in needed):  # pragma: no cover
        dist_checkpointing.save(sharded_state_dict, checkpoint_dir)
        return
    dist_checkpointing.save(sharded_state_dict, checkpoint_dir,
                            sharded_strategy=_sync_torch_dist_strategy(mtorch.MCoreSavePlanner))


# --- router (C2RRouter): constructor keywords and gating ---
def topk_router_kwargs(router_kwargs: dict) -> dict:
    """The keywords a ``TopKRouter`` subclass forwards to ``TopKRouter.__init__`` beyond
    ``config``/``pg_collection``: 0.16/0.17 MoELayers pass none, 0.18+ pass ``is_mtp_layer``.
    Forwarded unchanged when this TopKRouter accepts them; a keyword it does not know (a mixed
    install) is a one-line TypeError instead of a traceback from deep inside Megatron."""
    from megatron.core.transformer.moe.router import TopKRouter

    accepted = supported_kwargs(TopKRouter, router_kwargs)
    unknown = sorted(set(router_kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"TopKRouter of megatron-core {MCORE_VERSION} does not accept {unknown}: the MoE layer "
            "and the router come from different Megatron versions; reinstall one megatron-core"
        )
    return accepted


def use_stock_router_gating(device: Any, *, te_gemm_defined: Optional[bool] = None) -> bool:
    """True where a router should run Megatron's own ``Router.gating``: on CUDA with
    transformer-engine, where ``router_gating_linear`` takes bf16 activations straight into TE's
    fp32-output GEMM (``te_general_gemm``; no fp32 copy of the [T, H] input). Elsewhere False:
    0.16-0.20's ``Router.gating`` moves CPU weights to ``torch.cuda.current_device()``, and
    0.16.1 without TE never defines ``moe_utils.te_general_gemm`` (the stock gating raises
    ``NameError`` on CUDA), so the caller keeps a device-agnostic copy of the same math
    (``routing.functional.gating_linear``; without TE both paths make the same fp32 copy).
    ``te_gemm_defined`` overrides the probe of ``moe_utils`` (tests)."""
    if torch.device(device).type != "cuda":
        return False
    if te_gemm_defined is None:
        from megatron.core.transformer.moe import moe_utils

        te_gemm_defined = getattr(moe_utils, "te_general_gemm", None) is not None
    return te_gemm_defined


# --- dedup dispatcher (moe/dispatcher.py): config fields that differ between versions ---
# Router padding for quantized GEMMs: 0.16/0.17 keep moe_router_padding_for_fp8 as an alias of
# moe_router_padding_for_quantization; older releases have only the fp8 name.
_ROUTER_PADDING_FIELDS = ("moe_router_padding_for_quantization", "moe_router_padding_for_fp8")
# CUDA-graph scope names (0.16-0.18 ``CudaGraphScope``, 0.19+ ``CudaGraphModule``) that capture
# an MoE layer or part of it; "attn", "mlp" (dense layers only) and "mamba" do not.
_MOE_CAPTURING_SCOPES = frozenset(
    {"full_iteration", "full_iteration_inference", "moe", "moe_router", "moe_preprocess"}
)


def router_padding_flag(config) -> Optional[str]:
    """The name of the router-padding-for-quantization field set True on ``config``, or None."""
    for name in _ROUTER_PADDING_FIELDS:
        if getattr(config, name, False):
            return name
    return None


def _scope_names(scopes) -> list:
    """Scope names from any accepted spelling: None, "a,b", "full", an enum, a list of either."""
    if scopes is None:
        return []
    if isinstance(scopes, str):
        scopes = [s.strip() for s in scopes.split(",") if s.strip()]
    elif not isinstance(scopes, (list, tuple)):
        scopes = [scopes]
    names = [getattr(s, "name", str(s)) for s in scopes]
    return [] if names == ["full"] else names  # "full" (deprecated) = [] = the whole layer


def moe_cuda_graph_capture(config) -> Optional[str]:
    """``"field=value"`` for the CUDA-graph setting of ``config`` that would capture an MoE layer
    (or its router / preprocess), or None when MoE layers run eagerly.

    0.16-0.18: ``cuda_graph_impl`` ('none' | 'local' | 'transformer_engine', also set by the
    deprecated ``enable_cuda_graph`` / ``external_cuda_graph``) with ``cuda_graph_scope`` (a list
    of ``CudaGraphScope``; empty or the default "full" = the whole layer; ``full_iteration``).
    0.19+: the whole-iteration graph moves to ``cuda_graph_impl='full_iteration'`` and the scope
    field becomes ``cuda_graph_modules`` (``CudaGraphModule``); ``inference_cuda_graph_scope=block``
    graphs whole blocks.
    """
    impl = getattr(config, "cuda_graph_impl", "none") or "none"
    legacy = [n for n in ("enable_cuda_graph", "external_cuda_graph") if getattr(config, n, False)]
    if impl == "none" and not legacy:
        return None
    if impl == "full_iteration":
        return "cuda_graph_impl='full_iteration'"
    field = "cuda_graph_modules" if hasattr(config, "cuda_graph_modules") else "cuda_graph_scope"
    names = _scope_names(getattr(config, field, None))
    setting = f"cuda_graph_impl={impl!r}" if impl != "none" else f"{legacy[0]}=True"
    if not names:
        return f"{setting} with {field}=[] (the whole layer)"
    captured = [n for n in names if n in _MOE_CAPTURING_SCOPES]
    if captured:
        return f"{setting} with {field}={captured}"
    inference = getattr(config, "inference_cuda_graph_scope", None)
    if getattr(inference, "name", inference) == "block":
        return f"{setting} with inference_cuda_graph_scope=block"
    return None


# --- activation recompute ---
def in_backward() -> bool:
    """True while autograd runs a backward pass on this thread: where activation recompute
    (Megatron's ``tensor_parallel.checkpoint``/``te_checkpoint`` under ``--recompute-modules
    moe``, torch's reentrant checkpoint) re-runs a forward. Host-only (no device access)."""
    return torch._C._current_graph_task_id() != -1


# --- model-build checks without a GPU (megatron_lm/build_check.py) ---
def megatron_argument_parser():
    """Megatron-LM's own argument parser (every flag with its default), or None where the
    installed Megatron has none: ``megatron.training`` is in the wheel from 0.17; on 0.16 only a
    Megatron-LM checkout on ``sys.path`` provides it."""
    arguments = _optional_import("megatron.training.arguments")
    add = getattr(arguments, "add_megatron_arguments", None)
    if add is None:
        return None
    import argparse

    return add(argparse.ArgumentParser(add_help=False, allow_abbrev=False))


# Megatron-LM flags whose dest is another config field, for args parsed without its parser (0.16
# without a checkout): flag attribute -> the TransformerConfig field it turns off (or on).
_RENAMED_FLAGS_OFF = dict(
    disable_bias_linear="add_bias_linear", no_bias_swiglu_fusion="bias_swiglu_fusion",
    no_bias_gelu_fusion="bias_activation_fusion", no_bias_dropout_fusion="bias_dropout_fusion",
    no_masked_softmax_fusion="masked_softmax_fusion", no_rope_fusion="apply_rope_fusion",
    no_gradient_accumulation_fusion="gradient_accumulation_fusion",
)
_RENAMED_FLAGS_ON = dict(apply_layernorm_1p="layernorm_zero_centered_gamma")


def apply_megatron_arg_defaults(args) -> None:
    """The part of Megatron-LM's ``validate_args`` that decides how the MoE layers are built
    and needs no GPU (``validate_args`` itself reads the device): expert TP defaults to TP, the
    parameter dtype follows --bf16/--fp16, and the parallel sizes default to 1 where the flags
    were given without Megatron's parser (whose renamed flags, ``_RENAMED_FLAGS_OFF`` / ``_ON``,
    are then mapped here). In place."""
    for renamed, value in ((_RENAMED_FLAGS_OFF, False), (_RENAMED_FLAGS_ON, True)):
        for flag, field in renamed.items():
            if getattr(args, flag, None) is True and not hasattr(args, field):
                setattr(args, field, value)
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "context_parallel_size", "expert_model_parallel_size"):  # fmt: skip
        if getattr(args, name, None) is None:
            setattr(args, name, 1)
    if getattr(args, "expert_tensor_parallel_size", None) is None:
        args.expert_tensor_parallel_size = args.tensor_model_parallel_size
    if getattr(args, "bf16", False):
        args.params_dtype = torch.bfloat16
    elif getattr(args, "fp16", False):
        args.params_dtype = torch.half
    else:
        args.params_dtype = torch.float32


# Fusions whose TransformerConfig check is "is transformer-engine installed": off when checking a
# command line on a machine without TE (its cluster image has TE; Megatron checks them there).
_TE_ONLY_FUSIONS = ("apply_rope_fusion", "moe_permute_fusion")


def _list_only(hint) -> bool:
    """True for a field typed ``List[...]`` / ``Optional[list[...]]`` (no scalar alternative)."""
    import typing

    options = [hint]
    if typing.get_origin(hint) is typing.Union:
        options = [a for a in typing.get_args(hint) if a is not type(None)]
    return bool(options) and all(a is list or typing.get_origin(a) is list for a in options)


def transformer_config_from_args(args):
    """Megatron's ``TransformerConfig`` (or ``MLATransformerConfig`` with
    --multi-latent-attention) from parsed args, as Megatron-LM's
    ``core_transformer_config_from_args`` maps them (same-named fields, ``num_experts`` ->
    ``num_moe_experts``, --swiglu -> gated SiLU, query groups only with
    --group-query-attention); its ``__post_init__`` runs Megatron's config checks. Needs no GPU;
    without transformer-engine the TE-only fusions are off (``_TE_ONLY_FUSIONS``)."""
    from megatron.core.transformer import TransformerConfig

    config_class = TransformerConfig
    if getattr(args, "multi_latent_attention", False):
        from megatron.core.transformer import MLATransformerConfig as config_class
    kwargs = {}
    for f in dataclasses.fields(config_class):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            # A list-only field given one value without Megatron's parser (nargs='*' there)
            if _list_only(f.type) and value is not None and not isinstance(value, (list, tuple)):
                value = [value]
            kwargs[f.name] = value
    kwargs["num_moe_experts"] = getattr(args, "num_experts", None)
    kwargs["pipeline_dtype"] = args.params_dtype
    if getattr(args, "swiglu", False):
        kwargs["activation_func"] = torch.nn.functional.silu
        kwargs["gated_linear_unit"] = True
    if not getattr(args, "group_query_attention", False):
        kwargs["num_query_groups"] = None
    if isinstance(kwargs.get("cp_comm_type"), list) and len(kwargs["cp_comm_type"]) == 1:
        kwargs["cp_comm_type"] = kwargs["cp_comm_type"][0]
    if kwargs.get("rope_type", "") is None:
        kwargs.pop("rope_type")
    if not HAVE_TE:  # checked where TE is installed (the cluster image), not here
        for name in _TE_ONLY_FUSIONS:
            kwargs[name] = False
    return config_class(**kwargs)


# --- streaming torch_dist I/O (offline convert, tensor by tensor) ---
class DistCheckpointReader:
    """Reads one torch_dist checkpoint piece by piece: ``read`` loads rows [start, stop) of one
    tensor through torch DCP with Megatron's load planner (the layout Megatron wrote, any
    writer parallelism); the DCP metadata is read once, not per call. Memory per call: the
    slice plus the stored chunks it overlaps (DCP deserialises a stored chunk whole, then
    narrows it). Needs torch.distributed initialised (one process is enough)."""

    def __init__(self, checkpoint_dir: str):
        from megatron.core.dist_checkpointing.strategies import torch as mtorch

        self._mtorch = mtorch
        self._reader = mtorch._get_filesystem_reader(checkpoint_dir, cache_metadata=True)

    def read(self, key: str, global_shape, dtype, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of axis 0 of tensor ``key`` (global shape ``global_shape``; a 0-d
        tensor is read whole)."""
        import torch.distributed.checkpoint as dcp
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        global_shape = tuple(global_shape)
        shape = (stop - start, *global_shape[1:]) if global_shape else ()
        offset = (start,) + (0,) * (len(global_shape) - 1) if global_shape else ()
        sh_ten = ShardedTensor(key, torch.empty(shape, dtype=dtype), dtype, shape, global_shape,
                               offset, None)
        state, _, _ = self._mtorch._replace_state_dict_keys_with_sharded_keys({key: sh_ten})
        pyt_state = self._mtorch.mcore_to_pyt_state_dict(state, True)
        dcp.load(pyt_state, storage_reader=self._reader, planner=self._mtorch.MCoreLoadPlanner())
        return sh_ten.data


def placeholder_tensor(shape, dtype) -> torch.Tensor:
    """A tensor of ``shape``/``dtype`` that holds one element (zero strides): stands in for data
    that ``save_dist_checkpoint_streaming`` asks for only when it writes it."""
    return torch.zeros((), dtype=dtype).expand(tuple(shape))


def save_dist_checkpoint_streaming(sharded_state_dict: dict, checkpoint_dir: str,
                                   materialize) -> None:
    """``save_dist_checkpoint`` for state dicts whose ShardedTensors hold placeholders
    (``placeholder_tensor``): ``materialize(key, global_offset)`` returns a chunk's real data
    when torch DCP writes that chunk, so one chunk is in memory at a time, not the checkpoint.

    Two torch DCP details make that hold (torch 2.6-2.13): its serial CPU loader resolves one
    write item at a time (forced by ``per_thread_copy_ahead=0``; the overlapping loader used
    with CUDA would resolve ahead), but ``_write_files_from_queue`` keeps every written tensor
    in a dict until the file closes (used only for safetensors output). So the previous chunk's
    storage is released (resized to 0 bytes) when the next one is asked for; its bytes are on
    disk by then. The result is the same torch_dist layout as ``save_dist_checkpoint``.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import torch as mtorch
    from torch.distributed.checkpoint.planner import WriteItemType

    class _StreamingPlanner(mtorch.MCoreSavePlanner):
        _previous: Optional[torch.Tensor] = None

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            if self._previous is not None:
                self._previous.untyped_storage().resize_(0)
            data = materialize(write_item.index.fqn, tuple(write_item.index.offset)).contiguous()
            if data.untyped_storage().nbytes() != data.nbytes:
                data = data.clone()  # DCP would clone a view itself, out of our reach
            self._previous = data
            return data

    strategy = _sync_torch_dist_strategy(_StreamingPlanner, per_thread_copy_ahead=0)
    dist_checkpointing.save(sharded_state_dict, checkpoint_dir, sharded_strategy=strategy)


def _sync_torch_dist_strategy(planner_cls, **writer_kwargs):
    """The torch_dist save strategy of ``save_dist_checkpoint``: Megatron's key translation, then
    torch DCP's synchronous ``FileSystemWriter`` (one thread, plus ``writer_kwargs``) with
    ``planner_cls`` (``MCoreSavePlanner`` or a subclass)."""
    from megatron.core.dist_checkpointing.strategies import torch as mtorch
    import torch.distributed.checkpoint as dcp

    class _SyncTorchDistSave(mtorch.TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            state, _, _ = mtorch._replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica
            )
            dcp.save(
                mtorch.mcore_to_pyt_state_dict(state, False),
                storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1,
                                                    **writer_kwargs),
                planner=planner_cls(dedup_replicated_tensors=not self.keep_only_main_replica,
                                    flatten_state_dict=False),
            )

    return _SyncTorchDistSave("torch_dist", 1)


# --- torch_dist metadata: tensor keys without Megatron's metadata loader ---
def dist_checkpoint_tensor_keys(checkpoint_dir: str) -> list:
    """The ShardedTensor keys of a torch_dist checkpoint (what ``dist_checkpointing.
    load_tensors_metadata`` returns the keys of), from its DCP metadata file only: no tensor
    data, no process group. Read directly because Megatron's loader rebuilds every tensor with
    ``torch.empty(**TensorProperties.__dict__)``, which raises on torch >= 2.15 (the properties
    gained ``strides``) with megatron-core 0.19.2."""
    from megatron.core.dist_checkpointing.strategies import torch as mtorch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = mtorch._get_filesystem_reader(checkpoint_dir).read_metadata()
    return [k for k, m in metadata.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)]  # fmt: skip


# --- the flex token dispatcher (moe_token_dispatcher_type='flex') ---
# Megatron's flex dispatcher hands (routing_map, probs) to a backend manager in
# ``token_dispatcher``: deepep and ncclep rebuild each token's experts with ``torch.topk(probs,
# k)`` in ``setup_metadata`` (so a router must give probs > 0 to exactly its selected experts);
# hybridep ships the routing map itself. The kernels are CUDA-only, the metadata step is not.
_FLEX_MANAGERS = {"deepep": "_DeepepManager", "hybridep": "_HybridEPManager",
                  "ncclep": "_NCCLEPManager"}  # fmt: skip


def flex_backends() -> tuple:
    """The ``moe_flex_dispatcher_backend`` values this megatron-core declares (its
    ``TransformerConfig`` Literal, which the dataclass itself does not enforce): deepep and
    hybridep (0.16-0.18), plus ncclep (0.19)."""
    import re
    import typing

    from megatron.core.transformer.transformer_config import TransformerConfig

    field = {f.name: f for f in dataclasses.fields(TransformerConfig)}["moe_flex_dispatcher_backend"]
    hint = field.type
    if isinstance(hint, str):  # postponed annotations: "Literal['deepep', 'hybridep']"
        return tuple(re.findall(r"['\"](\w+)['\"]", hint))
    return tuple(typing.get_args(hint))


def _flex_manager_class(backend: str):
    from megatron.core.transformer.moe import token_dispatcher

    return getattr(token_dispatcher, _FLEX_MANAGERS.get(backend, ""), None)


def flex_token_indices(backend: str, routing_map_TE: torch.Tensor, probs_TE: torch.Tensor, *,
                       topk: int, capacity_factor: Optional[float] = None):
    """What Megatron's flex ``backend`` makes of one rank's (routing_map, probs) [T, E] before
    its CUDA kernel: ``(indices_TK, probs_TK)`` from the backend manager's own
    ``setup_metadata`` (``torch.topk(probs, topk)``, dropped slots -1 where the backend masks
    them), or ``None`` for a backend that ships the routing map as is (hybridep). E and k are
    already TP-folded by the caller where TP > 1 (``MoEFlexTokenDispatcher`` passes
    ``tp * num_moe_experts`` and ``tp * topk``). The manager's constructor (which needs DeepEP
    or TE's NCCL EP and a CUDA device) is not run: only the attributes ``setup_metadata`` reads
    are set. Pure tensor work on the inputs' device."""
    cls = _flex_manager_class(backend)
    if cls is None:
        raise ValueError(f"megatron-core {MCORE_VERSION} has no flex backend {backend!r}")
    if backend == "hybridep":
        return None
    manager = object.__new__(cls)
    manager.num_experts, manager.router_topk = routing_map_TE.shape[-1], topk
    manager.capacity_factor = capacity_factor
    manager.setup_metadata(routing_map_TE, probs_TE)
    return manager.token_indices, manager.token_probs


def _flex_masks_dropped(backend: str) -> bool:
    """Whether ``backend``'s metadata marks a capacity-dropped (token, expert) slot as -1 (not
    sent), probed on one token with k = 2 and one slot dropped."""
    routing_map = torch.tensor([[True, False, False]])
    probs = torch.tensor([[1.0, 0.0, 0.0]])
    out = flex_token_indices(backend, routing_map, probs, topk=2, capacity_factor=1.0)
    return out is None or int(out[0][0, 1]) == -1


def flex_problem(config, tp_size: int, ep_size: int) -> Optional[str]:
    """The one-line reason Megatron's flex dispatcher of this megatron-core would refuse (at
    build, on every rank) or silently mis-route ``config``, or None. For
    ``moe_token_dispatcher_type='flex'`` only; what ``TransformerConfig`` already refuses
    (deepep with pad-to-capacity, ...) is left to it."""
    if getattr(config, "moe_token_dispatcher_type", None) != "flex":
        return None
    backend = config.moe_flex_dispatcher_backend
    backends = flex_backends()
    if backend not in backends or _flex_manager_class(backend) is None:
        return (f"moe_flex_dispatcher_backend={backend!r} is not a flex backend of megatron-core "
                f"{MCORE_VERSION} ({', '.join(backends)}): use one of those"
                + (" or megatron-core >= 0.19" if backend == "ncclep" else ""))
    # 0.16-0.18 assert TP x EP > 1 for every backend; 0.19 (the release that added ncclep)
    # only for deepep and ncclep.
    if tp_size * ep_size == 1 and (backend != "hybridep" or "ncclep" not in backends):
        return (f"moe_token_dispatcher_type='flex' with moe_flex_dispatcher_backend={backend!r} "
                f"needs tensor x expert parallel > 1 (megatron-core {MCORE_VERSION} asserts it), "
                "got TP=1 x EP=1: raise --expert-model-parallel-size or use alltoall")
    if backend == "ncclep" and getattr(config, "moe_expert_rank_capacity_factor", None) is None:
        return ("moe_flex_dispatcher_backend='ncclep' needs moe_expert_rank_capacity_factor (it "
                "sizes the per-rank receive buffer; Megatron refuses at build): set "
                "--moe-expert-rank-capacity-factor, e.g. 2.0")
    if config.moe_expert_capacity_factor is not None and not _flex_masks_dropped(backend):
        return (f"moe_expert_capacity_factor={config.moe_expert_capacity_factor} with "
                f"moe_flex_dispatcher_backend={backend!r}: megatron-core {MCORE_VERSION}'s "
                "backend rebuilds k experts per token with torch.topk and does not mask the "
                "dropped ones, so dropped tokens are sent anyway: unset the capacity factor "
                "(dropless) or use deepep/hybridep")
    from megatron.core.transformer.moe import token_dispatcher as td

    flex, base = td.MoEFlexTokenDispatcher, td.MoETokenDispatcher
    overrides = flex.set_shared_experts is not getattr(base, "set_shared_experts", None)
    if getattr(config, "moe_shared_expert_overlap", False) and overrides:  # raises on 0.16
        return (f"moe_shared_expert_overlap=True with moe_token_dispatcher_type='flex': "
                f"megatron-core {MCORE_VERSION}'s flex dispatcher does not support it: unset "
                "--moe-shared-expert-overlap or use alltoall")
    return None
