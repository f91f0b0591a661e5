"""The cluster cost model behind ``megatron-c2r estimate``.

``inputs`` (the model's shape, link parameters and routing source, from a run config),
``routing`` (routing maps from the router's own rules, uniform or clustered),
``model`` (row counts from the dispatchers' own counting code, per-pass and per-layer time),
``calibration`` (the model against published DeepEP and NCCL figures).
Pure Python and torch: no Megatron, no YAML (``tests/unit/test_layering.py``).
"""
