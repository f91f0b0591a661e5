"""The cluster path: Megatron-LM GPT pretraining with C2R MoE layers.

    python -m megatron_c2r.megatron_lm <pretrain_gpt.py flags> --c2r-mode group ...   (train.py)
    megatron-c2r pretrain CONFIG.yaml [--set k=v]     the same, with argv rendered from YAML

flags.py           the --c2r-* flag table and the cluster-only config checks (no torch)
arguments.py       the --c2r-* flag group (Megatron's extra_args_provider)
model_provider.py  the GPT builder with our block spec
hooks.py           per-iteration router schedule and metrics, driven from forward_step
train.py           the entry point (needs a Megatron-LM checkout and CUDA)
"""
