"""``c2r.hierarchy`` and ``c2r.gpus_per_node`` as options (issue 14 part 2): the dataclass, the
``--c2r-*`` flags derived from it (both directions), and the run config's node checks, each a
one-line error naming the YAML path (and the ``--set`` that set it). No torch needed."""

from __future__ import annotations

import argparse
import os

import pytest

from megatron_c2r.errors import ConfigError
from megatron_c2r.megatron_lm.arguments import add_c2r_args, c2r_options_from_args
from megatron_c2r.megatron_lm.flags import C2R_FLAGS, c2r_argv
from megatron_c2r.moe.options import HIERARCHIES, C2ROptions
from megatron_c2r.routing.config import C2RRouterConfig
from megatron_c2r.run_config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OLMOE = os.path.join(ROOT, "configs", "olmoe_1b_7b_c2r.yaml")  # EP 8 on 1 node of 8
MIXTRAL = os.path.join(ROOT, "configs", "mixtral_8x7b_c2r.yaml")  # EP 4, 8 nodes of 8
DEEPSEEK = os.path.join(ROOT, "configs", "deepseek_v3_like_c2r.yaml")  # EP 32 on 4 nodes of 8
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")


def test_hierarchy_is_checked_and_gpus_per_node_is_the_routers_one_key():
    assert HIERARCHIES == ("auto", "flat", "two_level") and C2ROptions().hierarchy == "auto"
    with pytest.raises(ValueError, match=r"^c2r.hierarchy='deepep' must be one of auto, flat, two_level$"):
        C2ROptions(hierarchy="deepep")
    with pytest.raises(ValueError, match=r"c2r.hierarchy='flat' applies to c2r.dispatcher='dedup' only"):
        C2ROptions(hierarchy="flat", dispatcher="megatron")
    options = C2ROptions(router=C2RRouterConfig(gpus_per_node=2))
    assert options.gpus_per_node == 2 and C2ROptions().gpus_per_node is None
    # One flag each; gpus_per_node is not a second C2ROptions field shadowing the router's.
    assert C2R_FLAGS["hierarchy"] == ("--c2r-hierarchy", "str")
    assert C2R_FLAGS["gpus_per_node"] == ("--c2r-gpus-per-node", "int")


def test_flags_round_trip_and_refuse_an_unknown_hierarchy(capsys):
    parser = add_c2r_args(argparse.ArgumentParser())
    options = C2ROptions(router=C2RRouterConfig(gpus_per_node=4), hierarchy="two_level")
    argv = c2r_argv(options)
    assert argv[argv.index("--c2r-hierarchy") + 1] == "two_level"
    assert argv[argv.index("--c2r-gpus-per-node") + 1] == "4"
    assert c2r_options_from_args(parser.parse_args(argv)) == options
    assert c2r_options_from_args(parser.parse_args([])).hierarchy == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--c2r-hierarchy", "deepep"])
    assert "invalid choice: 'deepep'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "path,sets,message",
    [
        (OLMOE, ["c2r.hierarchy=two_level"],
         r"^--set c2r.hierarchy=two_level: c2r.hierarchy='two_level' "
         r"needs an EP group spanning more than one node, but megatron.--expert-model-parallel-size=8 "
         r"fits in one \(launch.gpus_per_node=8\): use c2r.hierarchy: auto or flat$"),
        (MIXTRAL, ["c2r.hierarchy=two_level"], r"expert-model-parallel-size=4 fits in one"),
        (OLMOE, ["c2r.hierarchy=two_level", "c2r.gpus_per_node=8"],
         r"fits in one \(c2r.gpus_per_node=8\)"),
        (DEEPSEEK, ["c2r.gpus_per_node=12"],
         r"c2r.gpus_per_node=12 splits num_groups=32"),
        (DEEPSEEK, ["c2r.mode=group", "c2r.max_nodes=null", "c2r.gpus_per_node=12"],
         r"c2r.hierarchy='two_level': megatron.--expert-model-parallel-size=32 does not split "
         r"into nodes of 12 ranks \(c2r.gpus_per_node=12\)"),
        (DEEPSEEK, ["c2r.num_nodes=2"],
         r"c2r.num_nodes=2 but megatron.--expert-model-parallel-size=32 spans 4 node\(s\) "
         r"\(launch.gpus_per_node=8\): set c2r.num_nodes: 4$"),
    ],
    ids=["two_level_one_node", "two_level_small_ep", "two_level_simulated_one_node",
         "router_uneven_nodes", "dispatcher_uneven_nodes", "node_count_vs_launch"],
)
def test_run_config_refuses_node_layouts_the_dispatcher_or_router_cannot_use(path, sets, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, sets)
    assert "\n" not in str(info.value)


def test_cpu_job_has_one_machine_unless_nodes_are_simulated(monkeypatch):
    monkeypatch.chdir(ROOT)
    two_level = ["c2r.hierarchy=two_level"]
    with pytest.raises(ConfigError, match=r"the CPU job runs on one machine; c2r.gpus_per_node"):
        load_config("configs/tiny_cpu.yaml", two_level, world="cpu")
    simulated = load_config("configs/tiny_cpu.yaml", [*two_level, "c2r.gpus_per_node=1"], world="cpu")
    assert simulated.c2r.hierarchy == "two_level" and simulated.c2r.gpus_per_node == 1
    node = ["c2r.mode=node", "c2r.num_nodes=2"]
    with pytest.raises(ConfigError, match=r"give c2r.gpus_per_node instead .* or c2r.hierarchy: flat"):
        load_config("configs/tiny_cpu.yaml", node, world="cpu")
    flat = load_config("configs/tiny_cpu.yaml", [*node, "c2r.hierarchy=flat"], world="cpu")
    assert flat.c2r.router.num_nodes == 2
