"""Pure routing code: tensor in, tensor out, no Megatron imports, CPU-testable.

    config.py      C2RRouterConfig (the router's options; imports no torch)
    functional.py  the selection rules as functions, score functions, validation
    penalty.py     the collaboration penalty
    balance.py     group-level balance: DeepSeek-V2's device / communication losses, group bias
    rules/         one routing-rule object per mode, one family per file (what ``moe/router.py``
                   adapts to Megatron): base, top_t, limited, balanced, budgeted, soft

Shape-suffix legend, one meaning per letter in this package and in ``moe/router.py``:
    S  sequence length             B  micro-batch size       T  tokens (S*B flattened)
    E  experts                     K  top-k                  R  K-1 (the experts after the top-1)
    G  groups (EP ranks by default)                          N  experts per group (E // G)
    M  groups (or nodes) kept per token (max_groups / max_nodes)
    C  candidate columns (experts of the kept groups or ranks)
    D  nodes (node mode)           P  groups per node (G // D)   X  experts per node (P*N)
    Q  groups kept per chosen node (max_ranks_per_node)
    L  length of a top-T collaborator list (the paper's "T"; never T, which is tokens)
    U  experts a token takes in each group (K // G, group_balanced mode)
    H  hidden size

Import from the submodules (``routing.functional``, ``routing.rules``, ...). This package
imports nothing at load, so ``routing.config`` stays importable without torch (the SLURM
scripts render configs on batch hosts that may not have it).
"""
