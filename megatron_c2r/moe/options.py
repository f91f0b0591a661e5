"""``C2ROptions``: what the Megatron adapters need to build a C2R MoE layer (pure: no torch/Megatron).

One object per model, shared by every MoE layer: the router config (``C2RRouterConfig``, which
lives with the routing rules in ``megatron_c2r.routing.config``), which token dispatcher the layer
uses, and where the metrics go. The YAML layer (``megatron_c2r.run_config``, the ``c2r:`` section)
and the ``--c2r-*`` flags (``megatron_c2r.megatron_lm.flags``) both build it; this module imports
neither, so ``routing/``, ``comm/`` and ``moe/`` stay free of the YAML/run-config layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_c2r.routing.config import C2RRouterConfig

# Token dispatchers a C2R MoE layer can use (the one list; the layer, the YAML section and the
# --c2r-dispatcher flag all check against it):
#   "dedup"    ours: one row per (token, destination EP rank), expanded and pre-combined there
#   "megatron" Megatron's own, chosen by --moe-token-dispatcher-type (the A/B baseline)
DISPATCHERS = ("dedup", "megatron")


@dataclass(frozen=True, kw_only=True)
class C2ROptions:
    """The ``c2r:`` section: router options plus how the layer is built and observed.

    enabled: False -> the stock router and dispatcher (a baseline run with identical logging).
    router: the C2RRouterConfig every MoE layer shares (field names are the YAML keys).
    dispatcher: one of ``DISPATCHERS``: 'dedup' -> our MoE layer ships one row per (token,
        destination rank); 'megatron' -> Megatron's dispatcher from --moe-token-dispatcher-type.
    metrics_csv: append per-log-interval metrics here (written by the last rank).

    A placement plan is not an option here: it is applied to a checkpoint offline
    (``megatron-c2r convert --plan``) and loaded with ``--load``, because Megatron loads weights
    after the model is built, so relabelling at build time would be overwritten.
    """

    enabled: bool = True
    router: C2RRouterConfig = field(default_factory=C2RRouterConfig)
    dispatcher: str = "dedup"
    metrics_csv: Optional[str] = None

    def __post_init__(self):
        if self.dispatcher not in DISPATCHERS:
            raise ValueError(
                f"c2r.dispatcher={self.dispatcher!r} must be one of {', '.join(DISPATCHERS)}"
            )
