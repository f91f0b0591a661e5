"""Thin Megatron-core adapters: the C2R router, the de-duplicating dispatcher and MoE layer."""
