"""Import rules of the package layout: the hot-path packages never load the YAML/run-config layer,
and the command line and config layer load no torch or Megatron until a command needs them."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys

import megatron_c2r

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOT_PATH_PACKAGES = ("routing", "comm", "moe")
CONFIG_LAYER = ("megatron_c2r.run_config", "megatron_c2r.yaml_files")  # (megatron.core loads PyYAML)

# Imports each module in turn, in one interpreter, and names the first one after which a
# config-layer module is loaded (imports are transitive, so this checks what actually loads).
_CHECK = """
import importlib, sys
bad = {bad!r}
for name in {modules!r}:
    importlib.import_module(name)
    loaded = [m for m in bad if m in sys.modules]
    if loaded:
        raise SystemExit(f"{{name}} loads {{loaded}}")
"""


def _modules(package: str) -> list:
    path = os.path.join(os.path.dirname(megatron_c2r.__file__), package)
    names = [f"megatron_c2r.{package}"]
    names += [f"megatron_c2r.{package}.{m.name}" for m in pkgutil.iter_modules([path])]
    return names


def test_routing_comm_and_moe_never_import_the_yaml_or_run_config_layer():
    modules = [m for package in HOT_PATH_PACKAGES for m in _modules(package)]
    assert "megatron_c2r.moe.options" in modules and len(modules) > 10
    code = _CHECK.format(bad=CONFIG_LAYER, modules=modules)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_cli_and_config_layer_import_no_torch_or_megatron():
    modules = ["megatron_c2r.cli", "megatron_c2r.pretrain", "megatron_c2r.run_config",
               "megatron_c2r.yaml_files", "megatron_c2r.render", "megatron_c2r.cpu.job_config",
               "megatron_c2r.megatron_lm.flags", "megatron_c2r.megatron_lm.arguments",
               "megatron_c2r.moe.options", "megatron_c2r.parallel", "megatron_c2r.errors",
               "megatron_c2r.cost.inputs"]  # fmt: skip
    code = _CHECK.format(bad=("torch", "numpy", "megatron.core"), modules=modules)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_cost_model_imports_no_megatron_and_no_config_layer():
    modules = ["megatron_c2r.cost.model", "megatron_c2r.cost.routing",
               "megatron_c2r.cost.calibration", "megatron_c2r.cost.time_to_quality",
               "megatron_c2r.cost.quality_report"]  # fmt: skip
    code = _CHECK.format(bad=("megatron.core", *CONFIG_LAYER), modules=modules)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_tracker_and_placement_do_not_import_each_other_both_ways():
    # placement (planner) may use the tracker's top-T lists; the tracker imports no placement.
    code = _CHECK.format(bad=("megatron_c2r.placement",), modules=["megatron_c2r.collaboration"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
