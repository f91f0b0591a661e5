"""Pure routing functions: tensor in, tensor out, no Megatron imports, CPU-testable.

Shape legend used across this package:
    T  tokens (S*B flattened)      E  experts         K  top-k
    G  groups (EP ranks by default) N  experts per group (E // G)
    L  top-T list length

Import from the submodules (``routing.functional``, ``routing.penalty``, ``routing.config``).
This package imports nothing at load, so ``routing.config`` stays importable without torch (the
SLURM scripts render configs on batch hosts that may not have it).
"""
