"""`megatron-c2r convert` on real torch_dist checkpoints written by Megatron's DistributedOptimizer
(2 gloo processes, EP=2, CPU).

Two ranks build a GPTModel (2 MoE layers, SequentialMLP experts, expert bias), wrap it in
megatron.core's DistributedDataParallel + DistributedOptimizer (Adam, fp32 master state), take two
optimizer steps and save model + optimizer in Megatron-LM's layout (iter_0000002/) twice: with
``distrib_optim_sharding_type='fully_reshardable'`` (what ``--dist-ckpt-optim-fully-reshardable``
writes) and with Megatron-LM's default ``'dp_reshardable'``. Then:
    * fully_reshardable: convert; a fresh DDP + DistributedOptimizer loads the result and saves it
      again; every tensor of that re-save (weights, fp32 master copies, exp_avg, exp_avg_sq) is
      the whole-tensor oracle's relabelling of the source, and the MoE layers compute the same
      outputs;
    * dp_reshardable: refused in one line naming the save flag (nothing written); with
      --drop-optimizer converted without optimizer state.

Test-only adaptation (megatron.core 0.16.1 on CPU): DistributedOptimizer and its base class
allocate with ``device='cuda'`` (``_dummy_overflow_buf``, ``_scale_one``, ``found_inf``), call
``.cuda()`` and check ``param.type() == 'torch.cuda.FloatTensor'``; DDP allocates on
``torch.cuda.current_device()``. ``cuda_as_cpu`` (a TorchFunctionMode) maps those to CPU, and
``megatron_cpu`` patches ``current_device``. Gradients are set directly in DDP's ``main_grad``
buffers (a GPT forward needs the CUDA RNG tracker), which is what DistributedOptimizer reads.
Loading fully_reshardable state into torch.optim.Adam (CPU has no FusedAdam) needs one more
adaptation: ``_set_states_but_step``.
"""

from __future__ import annotations

import contextlib
import io
import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config

E, H, LAYERS, EP, ITERATION = 8, 32, 2, 2, 2
ORDERS = [[5, 2, 7, 0, 1, 6, 3, 4], [1, 0, 3, 2, 5, 4, 7, 6]]
FORMATS = ("fully_reshardable", "dp_reshardable")


class cuda_as_cpu(TorchFunctionMode):
    """Runs code written for CUDA tensors on CPU ones (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.cuda:
            return args[0]
        device = kwargs.get("device")
        if device is not None and "cuda" in str(device):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


def _plan():
    from megatron_c2r.placement.plan_file import Plan, PlanLayer

    layers = [PlanLayer.from_groups(i, [o[:E // 2], o[E // 2:]], {}) for i, o in enumerate(ORDERS)]
    return Plan(num_experts=E, ep_size=EP, top_k=2, layers=layers)


def _trained(seed: int, steps: int):
    """(model, optimizer): DDP + DistributedOptimizer over a GPTModel, ``steps`` Adam steps."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    init_parallel(ep=EP, gloo_groups=True)  # Megatron's distributed optimizer uses them
    config = moe_config(num_layers=LAYERS, hidden_size=H, num_moe_experts=E,
                        expert_model_parallel_size=EP, moe_router_score_function="sigmoid",
                        moe_router_enable_expert_bias=True)
    torch.manual_seed(seed)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(
        num_experts=E, moe_grouped_gemm=False), vocab_size=64, max_sequence_length=16)
    for layer in model.decoder.layers:
        g = torch.Generator().manual_seed(seed)
        layer.mlp.router.expert_bias.copy_(torch.randn(E, generator=g))
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-2, use_distributed_optimizer=True, bf16=False,
        params_dtype=torch.float32), [ddp])
    for step in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        for i, p in enumerate(ddp.parameters()):
            # Replicated parameters see the same (already reduced) gradient on every rank;
            # each rank's experts their own.
            expert = not getattr(p, "allreduce", True)
            rank_seed = 100 * dist.get_rank() if expert else 0
            g = torch.Generator().manual_seed(1000 * step + i + rank_seed)
            p.main_grad.copy_(torch.randn(p.shape, generator=g))
        opt.step()
    return model, opt


def _metadata(fmt: str) -> dict:
    """What Megatron-LM passes sharded_state_dict (training/checkpointing.py)."""
    return {"distrib_optim_sharding_type": fmt, "chained_optim_avoid_prefix": True,
            "singleton_local_shards": False}


def _save(model, opt, root: str, fmt: str) -> None:
    from megatron_c2r import compat

    iter_dir = os.path.join(root, f"iter_{ITERATION:07d}")
    os.makedirs(iter_dir, exist_ok=True)
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd, "iteration": ITERATION,
             "optimizer": opt.sharded_state_dict(model_sd, metadata=_metadata(fmt))}
    compat.save_dist_checkpoint(state, iter_dir)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(ITERATION))
    dist.barrier()


def _moe_outputs(model):
    x = torch.randn(6, 2, H, generator=torch.Generator().manual_seed(7 + dist.get_rank()))
    with torch.no_grad():
        return [layer.mlp(x)[0].clone() for layer in model.decoder.layers]


def _save_sources(tmp: str):
    with megatron_cpu(), cuda_as_cpu():
        model, opt = _trained(seed=1, steps=2)
        for fmt in FORMATS:
            _save(model, opt, os.path.join(tmp, fmt), fmt)
        return _moe_outputs(model)


def _whole(path: str) -> dict:
    """{key: whole tensor} of a torch_dist directory (the oracle's input)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    meta = {k: v for k, v in load_sharded_metadata(path).items() if isinstance(v, ShardedTensor)}
    loaded = dist_checkpointing.load(meta, path, validate_access_integrity=False)
    return {v.key: loaded[k] for k, v in meta.items()}


def _convert_all(tmp: str):
    from megatron_c2r.cli import main
    from megatron_c2r.placement.plan_file import write_plan

    write_plan(_plan(), os.path.join(tmp, "plan.json"))
    out = {}
    for name, fmt, extra in [("fully", "fully_reshardable", []), ("dp", "dp_reshardable", []),
                             ("dp_drop", "dp_reshardable", ["--drop-optimizer"])]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["convert", "--load", os.path.join(tmp, fmt), "--plan",
                       os.path.join(tmp, "plan.json"), "--save", os.path.join(tmp, f"out_{name}"),
                       *extra])
        out[name] = (rc, err.getvalue().strip(), os.path.exists(os.path.join(tmp, f"out_{name}")))
    out["leftovers"] = sorted(n for n in os.listdir(tmp) if n.startswith(".c2r"))
    return out


def _set_states_but_step(self, model_param, tensors):
    """DistributedOptimizer._set_main_param_and_optimizer_states (0.16.1) copies every state key
    of the optimizer, 'step' included: torch.optim.Adam (the fallback without TE/apex FusedAdam,
    so on CPU) keeps a per-parameter 'step' tensor that the fully_reshardable format stores in
    param_groups instead. The same copy, with 'step' left as the optimizer has it."""
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    for key, dst in {"param": main_param, **self.optimizer.state[main_param]}.items():
        if key != "step":
            dst.copy_(tensors[key])


def _reload_and_resave(tmp: str):
    from megatron.core import dist_checkpointing
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    ckpt = os.path.join(tmp, "out_fully", f"iter_{ITERATION:07d}")
    metadata = _metadata("fully_reshardable")
    with megatron_cpu(), cuda_as_cpu():
        model, opt = _trained(seed=2, steps=1)  # other weights, other Adam state
        model_sd = model.sharded_state_dict()
        state = dist_checkpointing.load(
            {"model": model_sd, "optimizer": opt.sharded_state_dict(
                model_sd, is_loading=True, metadata=metadata)}, ckpt)
        model.load_state_dict(state["model"])
        with mock.patch.object(DistributedOptimizer, "_set_main_param_and_optimizer_states",
                               _set_states_but_step):
            opt.load_state_dict(state["optimizer"])
        _save(model, opt, os.path.join(tmp, "resaved"), "fully_reshardable")
        return _moe_outputs(model)


def _compare_with_oracle(tmp: str):
    from megatron_c2r.placement.checkpoint import relabel_tensors

    it = f"iter_{ITERATION:07d}"
    oracle = relabel_tensors(_whole(os.path.join(tmp, "fully_reshardable", it)), _plan())
    out = {}
    for name in ("out_fully", "resaved"):
        got = _whole(os.path.join(tmp, name, it))
        out[name] = dict(keys_equal=set(got) == set(oracle),
                         differ=sorted(k for k in oracle if not torch.equal(oracle[k], got[k])))
    dropped = _whole(os.path.join(tmp, "out_dp_drop", it))
    dp_oracle = relabel_tensors(_whole(os.path.join(tmp, "dp_reshardable", it)), _plan(),
                                drop_optimizer=True)
    out["dp_drop"] = dict(keys_equal=set(dropped) == set(dp_oracle),
                          differ=sorted(k for k in dp_oracle
                                        if not torch.equal(dp_oracle[k], dropped[k])),
                          optimizer_keys=[k for k in dropped if k.startswith("optimizer")])
    source = _whole(os.path.join(tmp, "fully_reshardable", it))
    out["optimizer_keys"] = sorted(k for k in source if k.startswith("optimizer.state."))
    out["experts_moved"] = [k for k in source
                            if "experts" in k and not torch.equal(source[k], oracle[k])]
    return out


@pytest.mark.world_size(2)
def test_convert_relabels_a_distributed_optimizer_checkpoint_or_names_the_save_flag(dist_pool,
                                                                                   tmp_path):
    tmp = str(tmp_path)
    want = dist_pool(2).run(_save_sources, tmp)
    (converted,) = dist_pool(1).run(_convert_all, tmp)

    rc, msg, written = converted["dp"]
    assert rc == 2 and not written and len(msg.splitlines()) == 1, msg
    assert "dp_reshardable" in msg and "--dist-ckpt-optim-fully-reshardable" in msg
    assert "--drop-optimizer" in msg and "weights_only" not in msg
    for name in ("fully", "dp_drop"):
        assert converted[name][0] == 0 and converted[name][2], converted[name]
    assert converted["leftovers"] == []

    got = dist_pool(2).run(_reload_and_resave, tmp)
    for rank_want, rank_got in zip(want, got):
        for w, g in zip(rank_want, rank_got):
            assert (g - w).abs().max() <= 1e-6 * max(1.0, float(w.abs().max()))

    (r,) = dist_pool(1).run(_compare_with_oracle, tmp)
    for kind in ("param", "exp_avg", "exp_avg_sq"):
        assert any(k.startswith(f"optimizer.state.{kind}.") and "experts" in k
                   for k in r["optimizer_keys"]), kind
    assert any(k.startswith("optimizer.state.exp_avg.") for k in r["experts_moved"])
    for name in ("out_fully", "resaved", "dp_drop"):
        assert r[name]["keys_equal"] and r[name]["differ"] == [], (name, r[name])
    assert r["dp_drop"]["optimizer_keys"] == []
