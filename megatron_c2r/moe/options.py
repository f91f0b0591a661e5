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

# How the dedup dispatcher treats nodes (the one list; the layer, the two-level dispatcher's
# builder, the YAML section and --c2r-hierarchy check against it):
#   "auto"      two-level when the EP group spans more than one node, else flat (one all-gather
#               of a node key over the EP group per model at build time, none with gpus_per_node)
#   "flat"      one row per (token, destination rank) over one all-to-all, whatever the nodes
#   "two_level" one row per (token, destination node) across nodes, relayed inside the node
HIERARCHIES = ("auto", "flat", "two_level")


@dataclass(frozen=True, kw_only=True)
class C2ROptions:
    """The ``c2r:`` section: router options plus how the layer is built and observed.

    enabled: False -> the stock router and dispatcher (a baseline run with identical logging).
    router: the C2RRouterConfig every MoE layer shares (field names are the YAML keys).
    dispatcher: one of ``DISPATCHERS``: 'dedup' -> our MoE layer ships one row per (token,
        destination rank); 'megatron' -> Megatron's dispatcher from --moe-token-dispatcher-type.
    hierarchy: one of ``HIERARCHIES`` (dedup only; 'auto' is also the value with 'megatron',
        where it is not read).
    metrics_csv: append per-log-interval metrics here (written by the last rank).
    dispatch_dim / dispatch_ffn_hidden_size: BigMac low-dimensional dispatch
        (``megatron_c2r.moe.bigmac``): project each token H -> d after the router, ship and run
        the experts at d (FFN width ``dispatch_ffn_hidden_size``, None = the model's
        ``moe_ffn_hidden_size``), project d -> H after combine. None = off.

    ``gpus_per_node`` (property) is the router's ``c2r.gpus_per_node``: one YAML key and one flag
    for both readers. The router derives its node count from it (node mode); the dedup
    dispatcher, when it is set, takes nodes as blocks of that many consecutive global ranks
    instead of asking the processes where they run (simulated nodes on CPU, and no all-gather
    on a cluster whose ranks are placed node by node).

    A placement plan is not an option here: it is applied to a checkpoint offline
    (``megatron-c2r convert --plan``) and loaded with ``--load``, because Megatron loads weights
    after the model is built, so relabelling at build time would be overwritten.
    """

    enabled: bool = True
    router: C2RRouterConfig = field(default_factory=C2RRouterConfig)
    dispatcher: str = "dedup"
    hierarchy: str = "auto"
    metrics_csv: Optional[str] = None
    dispatch_dim: Optional[int] = None
    dispatch_ffn_hidden_size: Optional[int] = None

    def __post_init__(self):
        for name in ("dispatch_dim", "dispatch_ffn_hidden_size"):  # sizes vs H: at build time
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"c2r.{name}={getattr(self, name)} must be >= 1 (or unset)")
        if self.dispatch_ffn_hidden_size is not None and self.dispatch_dim is None:
            raise ValueError(
                f"c2r.dispatch_ffn_hidden_size={self.dispatch_ffn_hidden_size} sizes the experts "
                "of c2r.dispatch_dim (unset): set c2r.dispatch_dim or remove it"
            )
        if self.dispatcher not in DISPATCHERS:
            raise ValueError(
                f"c2r.dispatcher={self.dispatcher!r} must be one of {', '.join(DISPATCHERS)}"
            )
        if self.hierarchy not in HIERARCHIES:
            raise ValueError(
                f"c2r.hierarchy={self.hierarchy!r} must be one of {', '.join(HIERARCHIES)}"
            )
        if self.hierarchy != "auto" and self.dispatcher != "dedup":
            raise ValueError(
                f"c2r.hierarchy={self.hierarchy!r} applies to c2r.dispatcher='dedup' only "
                f"(dispatcher is {self.dispatcher!r}): remove c2r.hierarchy or use dedup"
            )

    @property
    def gpus_per_node(self) -> Optional[int]:
        """``c2r.gpus_per_node`` (stored once, in the router config; see the class docstring)."""
        return self.router.gpus_per_node
