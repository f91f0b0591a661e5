"""Collaboration-aware expert placement: sources -> planner -> plan file -> relabelling.

    sources.py      collaboration inputs (tracker state, traces, dumps, matrices) -> LayerCollab
    partition.py    balanced-partition search: objectives, swap search, repair to load caps
    exhaustive.py   exact search over every balanced partition (small E), flat or hierarchical
    planner.py      placement plans (flat or nodes-then-ranks, optional load bound), predictions
    plan_file.py    the plan contract: PlanLayer / Plan (write atomically, read and validate)
    permutation.py  what a relabelling does to every kind of state (one table; pure torch)
    relabel.py      apply a plan to a model in memory (router, experts, tracker, optimizer state)
    checkpoint.py   apply a plan to a torch_dist checkpoint offline, tensor by tensor
    replan.py       re-plan inside a running EP job (one all_to_all_single moves experts)
    (the `megatron-c2r plan` / `convert` subcommands are in megatron_c2r.cli)

Convention everywhere: a plan is applied as ``order`` (int64 [E]): NEW expert i is OLD expert
``order[i]``; order = the plan's groups concatenated (``permutation.order_from_groups``), so
group g becomes EP rank g's contiguous block.

Shape-suffix legend, one meaning per letter in this package:
    E  experts                    P  EP ranks (= a plan's groups: group g is EP rank g)
    G  groups of the router's group map (EP ranks by default), or planned groups not yet
       assigned to ranks         N  experts per rank / group (E // P)
    K  top-k                      T  tokens                 U  distinct top-k sets of a trace
    L  length of a top-T collaborator list (the paper's "T"; never T, which is tokens)
    C  candidate placements evaluated together (planner)    H  hidden size
    B  bytes of a raw payload (replan's all-to-all)
    M  experts of one node (the rank level of a hierarchical plan)
A leading MoE-layer axis (checkpoint tensors, stacked files) has no letter: shapes say
``[layers, ...]``.
"""
