"""The entry-path gaps of the Megatron-LM route, on real megatron.core objects (CPU, world size 1):
what the entry refuses before Megatron parses its flags, resuming a stock torch_dist checkpoint
(detected from its metadata, and the named --dist-ckpt-strictness really loads it), MTP layers
that route with C2R, and the pretrain_gpt.py --spec presets refusing what they cannot serve."""

import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch

from megatron_c2r import compat
from megatron_c2r.moe.options import C2ROptions
from megatron_c2r.megatron_lm import preflight
from megatron_c2r.routing.config import C2RRouterConfig
from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config

C2R_KEYS = ("constraint_active", "expert_to_group", "top_t_lists", "tracker.")


@pytest.fixture(scope="module")
def world1(megatron_world1):
    init_parallel()
    torch.manual_seed(0)
    yield


def build_gpt(config, spec, **kwargs):
    from megatron.core.models.gpt import GPTModel

    with megatron_cpu():
        return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=64,
                        max_sequence_length=16, **kwargs)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, named",
    [
        (["--modelopt-enabled"], "--modelopt-enabled"),
        (["--spec", "megatron_c2r.specs", "group1_te"], "--spec"),
        (["--use-legacy-models"], "--use-legacy-models"),
        (["--yaml-cfg", "m.yaml"], "--yaml-cfg"),
    ],
)
def test_entry_refuses_settings_that_replace_our_model_in_one_line_before_anything_starts(
    flags, named, capsys, monkeypatch
):
    from megatron_c2r.megatron_lm import entry

    monkeypatch.setattr("sys.argv", ["entry"])
    assert entry.main(["--num-layers", "2", *flags, "--c2r-mode", "group"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{named}=" in err and "not supported by megatron_c2r" in err
    assert "CUDA" not in err  # refused before the requirement checks


def test_argv_parsing_is_exact_like_megatrons_parser_and_ignores_other_flags():
    assert preflight.refusal_in_argv(["--num-layers", "2", "--load", "x"]) is None
    # allow_abbrev=False: a prefix of a refused flag is another flag, not the refused one
    assert preflight.refusal_in_argv(["--modelopt", "--spec-file", "x"]) is None
    # a malformed value is left to Megatron's parser (no argparse exit from our side)
    assert preflight.parse_entry_argv(["--ckpt-step", "abc", "--load"]).ckpt_step is None


def test_model_provider_refuses_modelopt_set_after_parsing_before_the_checkout_provider_runs():
    """Megatron-LM sets args.modelopt_enabled itself when --load holds a ModelOpt checkpoint."""
    from megatron_c2r.megatron_lm.model_provider import c2r_gpt_builder, c2r_model_provider

    args = SimpleNamespace(modelopt_enabled=True)
    calls = []
    provider = c2r_model_provider(lambda *a, **k: calls.append((a, k)), lambda: args)
    with pytest.raises(ValueError, match=r"^--modelopt-enabled=True is not supported") as info:
        provider(pre_process=True, post_process=True)
    assert "\n" not in str(info.value) and calls == []
    args.modelopt_enabled = False
    provider(pre_process=True, post_process=False, vp_stage=1)
    assert calls == [((c2r_gpt_builder, True, False, 1), {"config": None, "pg_collection": None})]


# --------------------------------------------------------------------------------------------
# Resuming a stock checkpoint
# --------------------------------------------------------------------------------------------
def save_megatron_lm_dir(model, root, iteration=4):
    """A Megatron-LM save directory: root/iter_XXXXXXX (torch_dist) + the tracker file."""
    path = os.path.join(root, f"iter_{iteration:07d}")
    os.makedirs(path)
    compat.save_dist_checkpoint(model.sharded_state_dict(), path)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as handle:
        handle.write(str(iteration))
    return path


@pytest.fixture(scope="module")
def checkpoints(world1, tmp_path_factory):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_c2r.moe.spec_builders import get_c2r_decoder_block_spec

    config = moe_config(num_layers=2)
    options = C2ROptions(router=C2RRouterConfig(mode="c2r", top_t=3, warmup_steps=2))
    stock = build_gpt(config, get_gpt_decoder_block_spec(config, use_transformer_engine=False))
    c2r_spec = get_c2r_decoder_block_spec(config, options, use_transformer_engine=False)
    root = tmp_path_factory.mktemp("ckpt")
    stock_dir = save_megatron_lm_dir(stock, str(root / "stock"))
    c2r_dir = save_megatron_lm_dir(build_gpt(config, c2r_spec), str(root / "c2r"))
    return SimpleNamespace(
        config=config, c2r_spec=c2r_spec, stock_model=stock, stock_dir=stock_dir,
        stock=str(root / "stock"), c2r=str(root / "c2r"), c2r_dir=c2r_dir,
    )  # fmt: skip


def test_tensor_keys_are_read_from_the_metadata_file_as_the_model_saved_them(checkpoints):
    # Not through Megatron's load_tensors_metadata: it raises on 0.19.2 with torch >= 2.15.
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    state = checkpoints.stock_model.sharded_state_dict()
    apply_factories(state)
    saved = {v.key for v in nested_values(state) if isinstance(v, ShardedTensor)}
    keys = preflight.checkpoint_tensor_keys(checkpoints.stock_dir)
    assert len(keys) == len(set(keys)) and set(keys) == saved
    assert any(k.endswith("mlp.router.weight") for k in keys)


def test_stock_checkpoint_is_found_from_its_metadata_and_refused_naming_the_strictness_flag(checkpoints):
    with pytest.raises(preflight.UnsupportedSetting) as info:
        preflight.resume_from_stock(["--load", checkpoints.stock, "--c2r-mode", "group"])
    message = str(info.value)
    assert "\n" not in message and "--dist-ckpt-strictness log_unexpected" in message
    assert "decoder.layers.mlp.router" in message
    found = preflight.resume_from_stock(
        ["--load", checkpoints.stock, "--dist-ckpt-strictness", "log_unexpected"]
    )
    assert found == preflight.StockResume(checkpoints.stock_dir, ("decoder.layers.mlp.",), 4)


def test_nothing_to_check_for_c2r_checkpoints_baselines_fresh_runs_and_other_formats(checkpoints, tmp_path):
    resume = preflight.resume_from_stock
    assert resume(["--load", checkpoints.c2r]) is None  # our router state is there
    assert resume(["--load", checkpoints.stock, "--c2r-disable"]) is None
    assert resume(["--load", checkpoints.stock, "--ckpt-format", "torch"]) is None
    assert resume(["--load", str(tmp_path)]) is None  # --save == --load on a first run
    assert resume(["--load", checkpoints.stock, "--ckpt-step", "9"]) is None
    # --load is empty: Megatron-LM falls back to --pretrained-checkpoint, so do we
    with pytest.raises(preflight.UnsupportedSetting):
        resume(["--load", str(tmp_path), "--pretrained-checkpoint", checkpoints.stock])


def test_c2r_mode_resuming_past_its_warm_up_is_told_the_absolute_warm_up_to_set(checkpoints):
    base = ["--load", checkpoints.stock, "--dist-ckpt-strictness", "log_all", "--c2r-mode", "c2r"]
    with pytest.raises(preflight.UnsupportedSetting, match=r"set --c2r-warmup-steps 4\+N \(e\.g\. 6\)"):
        preflight.resume_from_stock([*base, "--c2r-warmup-steps", "2"])
    assert preflight.resume_from_stock([*base, "--c2r-warmup-steps", "6"]).start_iteration == 4
    # --finetune restarts Megatron's count at 0: a 2-step warm-up is a real warm-up again
    assert preflight.resume_from_stock([*base, "--c2r-warmup-steps", "2", "--finetune"]) is not None


def test_the_named_strictness_loads_a_stock_checkpoint_into_a_c2r_model_and_only_router_state_stays_fresh(
    checkpoints,
):
    """What the refusal promises, on megatron.core's own loader: the default fails, log_unexpected
    loads every stock tensor and leaves exactly our router buffers at their initial values."""
    from megatron.core import dist_checkpointing

    model = build_gpt(checkpoints.config, checkpoints.c2r_spec)
    with pytest.raises(BaseException, match="router"):
        dist_checkpointing.load(model.sharded_state_dict(), checkpoints.stock_dir)
    state = dist_checkpointing.load(
        model.sharded_state_dict(), checkpoints.stock_dir, strict="log_unexpected"
    )
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(
        ".mlp.router." in k and any(part in k for part in C2R_KEYS) for k in result.missing_keys
    )
    for name, tensor in checkpoints.stock_model.state_dict().items():
        if tensor is not None and torch.is_tensor(tensor):
            torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    router = model.decoder.layers[0].mlp.router
    assert not bool(router.constraint_active) and int(router.tracker.tokens) == 0


# --------------------------------------------------------------------------------------------
# MTP layers
# --------------------------------------------------------------------------------------------
def test_mtp_layers_built_by_our_entry_route_with_c2r_and_are_stepped_out_of_their_warm_up(world1):
    from megatron_c2r.megatron_lm.model_provider import c2r_gpt_specs
    from megatron_c2r.moe.router import C2RRouter, c2r_routers, step_routers

    config = moe_config(num_layers=2, mtp_num_layers=1)
    options = C2ROptions(router=C2RRouterConfig(mode="group", warmup_steps=2))
    block, mtp = c2r_gpt_specs(config, options, use_transformer_engine=False)
    model = build_gpt(config, block, mtp_block_spec=mtp)
    routers = {n: type(m) for n, m in model.named_modules() if n.endswith("mlp.router")}
    mtp_layer = model.mtp.layers[0]  # its inner layer: 0.16 transformer_layer, 0.19 mtp_model_layer
    inner = "mtp_model_layer" if hasattr(mtp_layer, "mtp_model_layer") else "transformer_layer"
    assert set(routers) == {
        "decoder.layers.0.mlp.router", "decoder.layers.1.mlp.router",
        f"mtp.layers.0.{inner}.mlp.router",
    }  # fmt: skip
    assert set(routers.values()) == {C2RRouter}
    mtp_router = getattr(mtp_layer, inner).mlp.router
    assert mtp_router in list(c2r_routers(model)) and not mtp_router._active
    step_routers(model, 1)  # after the second iteration the warm-up is over
    assert mtp_router._active
    assert c2r_gpt_specs(moe_config(num_layers=2), options, use_transformer_engine=False)[1] is None


# --------------------------------------------------------------------------------------------
# pretrain_gpt.py --spec presets
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, named",
    [
        (dict(mtp_num_layers=1), "--mtp-num-layers=1"),
        (dict(moe_layer_freq=[1, 0]), "--moe-layer-freq=[1, 0]"),
        (dict(qk_layernorm=True), "--qk-layernorm"),
    ],
)
def test_spec_presets_refuse_what_plain_pretrain_gpt_would_silently_get_wrong(world1, overrides, named):
    from megatron.core.transformer.spec_utils import import_module

    spec = import_module(("megatron_c2r.specs", "group1_local"))
    with pytest.raises(ValueError, match="pretrain_gpt.py --spec megatron_c2r.specs") as info:
        build_gpt(moe_config(num_layers=2, **overrides), spec)
    assert named in str(info.value) and "\n" not in str(info.value)
    assert "python -m megatron_c2r.megatron_lm" in str(info.value)


def test_spec_presets_are_warm_up_free_and_a_preset_with_a_schedule_refuses_to_build(world1):
    from megatron_c2r import specs
    from megatron_c2r.moe.router import C2RRouter

    for name in ("group1_local", "group2_local", "topk_local"):
        spec = getattr(specs, name)
        router = compat.moe_submodules(spec.submodules.mlp).router.keywords["c2r_config"]
        assert router.warmup_steps == 0 and router.refresh_interval == 0
    model = build_gpt(moe_config(num_layers=2), specs.topk_local)
    assert all(isinstance(layer.mlp.router, C2RRouter) for layer in model.decoder.layers)
    # Someone deriving a preset with a warm-up gets told it would never end.
    mlp = specs.group1_local.submodules.mlp
    warm = dataclasses.replace(
        compat.moe_submodules(mlp).router.keywords["c2r_config"], warmup_steps=10
    )
    router = compat.moe_submodules(mlp).router
    mlp = compat.replace_moe_submodules(mlp, router=type(router)(router.func, c2r_config=warm))
    spec = compat.replace_layer_submodules(specs.group1_local, mlp=mlp)
    with pytest.raises(ValueError, match=r"c2r.warmup_steps=10.*never calls"):
        build_gpt(moe_config(num_layers=2), spec)
