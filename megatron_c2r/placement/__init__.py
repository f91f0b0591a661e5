"""Collaboration-aware expert placement: sources -> planner -> plan file -> relabelling.

    sources.py     collaboration inputs (tracker state, traces, dumps, matrices) -> LayerCollab
    planner.py     balanced partition of experts over EP ranks; predicted ranks per token
    plan_file.py   the plan JSON contract (write atomically, read and validate)
    relabel.py     apply a plan to a model in memory (router, experts, tracker, optimizer state)
    checkpoint.py  apply a plan to a torch_dist checkpoint offline
    replan.py      re-plan inside a running EP job (one all_to_all_single moves experts)
    cli_plan.py / cli_convert.py   the `megatron-c2r plan` / `convert` subcommands

Convention everywhere: a plan is applied as ``order`` (LongTensor [E]): NEW expert i is OLD
expert ``order[i]``; order = the plan's groups concatenated (group g = EP rank g).
"""
