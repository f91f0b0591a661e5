"""The one owner of ``moe/c2r/*`` metrics.

``report`` (``C2RMetrics``: record -> report -> reset, one collective and one host sync per report;
the console line) and ``stats`` (pure per-map statistics: ranks/nodes per token, load per rank and
node).
"""
