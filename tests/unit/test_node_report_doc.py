"""docs/comm_volume.md gets the short form of the node tables; the full output stays with the run."""

from benchmarks.node_report import doc_section


def test_the_doc_section_keeps_the_command_and_checks_and_points_at_the_full_tables():
    full = "\n\n".join([
        "Inter-node rows per token, measured with `python benchmarks/comm_volume.py --nodes 2`.",
        "Goals (issue 14), per topology:", "- a goal line\n" * 300,
        "| routing | rows |\n|---|---|\n" + "| x | 1.0 |\n" * 500,
        "Uniform-routing checks, two-level inter-node rows vs the formula:",
        "- 16e top-4 2 x 2: measured 0.959 vs formula 0.962 (-0.28%) OK",
        "Counter checks: 309 cases, all passed.",
    ])
    short = doc_section(full, "benchmarks/results/comm_volume")
    assert short.startswith("Inter-node rows per token, measured with `python benchmarks/")
    assert "measured 0.959 vs formula 0.962" in short and "Counter checks: 309 cases" in short
    assert "benchmarks/results/comm_volume/comm_volume_nodes.md" in short
    assert "--render-json benchmarks/results/comm_volume/comm_volume_nodes.json" in short
    assert "a goal line" not in short and "| x | 1.0 |" not in short
    assert len(short) < len(full) / 10
