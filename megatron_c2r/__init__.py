"""megatron-c2r: collaboration-constrained routing (C2R), collaboration-aware expert placement and a
de-duplicating expert-parallel communicator for Megatron-core MoE pretraining.

Vocabulary (Megatron's, plus ours once):
    logits -> scores -> probs, routing_map           Megatron's router naming contract
    collaboration C[i, j]                            tokens whose top-k holds both experts i and j
    top-T list of expert i                           the T most frequent collaborators of i
    group                                            a set of experts living on one EP rank
    placement                                        expert -> group (rank) assignment
    rows shipped                                     hidden vectors crossing the EP all-to-all
"""

__version__ = "0.1.0"
