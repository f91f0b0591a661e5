"""Every YAML we read is bounded: alias bombs, oversized, deep or huge inputs are refused in
milliseconds with one line naming the file or the --set (issue 13.2); ``read_bounded_text`` is the
size-limited reader other file readers reuse."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_c2r.errors import ConfigError
from megatron_c2r.run_config import load_config
from megatron_c2r.yaml_files import MAX_FILE_BYTES, MAX_YAML_DEPTH, read_bounded_text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")


def _bomb_lines(levels: int = 9) -> list:
    """``l0: &l0 [x, x, ...]`` then each level nine aliases of the one before: 9**levels values
    once expanded (9**9 = 387M) from about 1 KB of text."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return lines


def _nested_bomb_list(levels: int = 9) -> str:
    """The inline-list variant: anchors nested inside one flow list."""
    items = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


BOMBS = {
    "anchors_in_cpu_section": "cpu:\n" + "\n".join("  " + line for line in _bomb_lines()) + "\n",
    "inline_list_under_megatron": f"megatron:\n  --num-layers: 2\n  --data-path: {_nested_bomb_list()}\n",
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_an_alias_bomb_is_refused_in_under_a_second_naming_the_file(tmp_path, name):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMBS[name])
    assert os.path.getsize(path) < 1200  # a 1 KB file
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert time.perf_counter() - start < 1.0
    text = str(info.value)
    assert text.startswith(f"{path}: line ") and "aliases" in text and "\n" not in text


# The CLI in a child that reports its own peak memory (VmHWM, per process image: unlike
# ru_maxrss it does not count the pytest process the child was forked from).
_MEASURED = (
    "import sys\n"
    "from megatron_c2r.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    "sys.exit(code)\n"
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
@pytest.mark.parametrize("command", ["render", "train"])
def test_the_cli_refuses_a_bomb_fast_small_and_in_one_line(tmp_path, command):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMBS["inline_list_under_megatron"])
    argv = [command, str(path)] if command == "render" else [command, "--config", str(path)]
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _MEASURED, *argv], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)  # fmt: skip
    elapsed = time.perf_counter() - start
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"megatron-c2r {command}: error: {path}: line 3: YAML aliases" in out.stderr
    assert elapsed < 10  # interpreter start-up included; the parse itself is < 1 s (above)
    assert int(out.stdout) < 100 * 1024  # KiB: well under 100 MB


def test_an_alias_in_a_set_value_is_blamed_on_the_set():
    bomb = _nested_bomb_list()
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [f"megatron.data-path={bomb}"])
    assert time.perf_counter() - start < 1.0
    assert str(info.value).startswith("--set megatron.data-path=[&a0") and "aliases" in str(info.value)


def test_anchors_without_aliases_and_normal_configs_still_load(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(textwrap.dedent("""
        extends: %s
        c2r: {mode: group, max_groups: 2, warmup_steps: &w 10}
    """ % TINY))
    assert load_config(str(path)).c2r.router.warmup_steps == 10


def test_oversized_deep_and_huge_files_are_refused_fast(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("cpu:\n  x: '" + "a" * MAX_FILE_BYTES + "'\n")
    deep = tmp_path / "deep.yaml"
    deep.write_text("cpu:\n  x: " + "[" * (MAX_YAML_DEPTH + 1) + "]" * (MAX_YAML_DEPTH + 1) + "\n")
    huge = tmp_path / "huge.yaml"
    huge.write_text("cpu:\n  x: [" + ", ".join(["1"] * 60_000) + "]\n")  # ~180 KB, 60k values
    cases = {big: "the limit for a run config", deep: "nested deeper than",
             huge: "more than 50000 YAML values"}  # fmt: skip
    for path, message in cases.items():
        start = time.perf_counter()
        with pytest.raises(ConfigError) as info:
            load_config(str(path))
        assert time.perf_counter() - start < 1.0, path
        assert str(info.value).startswith(str(path)) and message in str(info.value), str(info.value)


def test_read_bounded_text_reads_at_most_the_limit_from_anything(tmp_path):
    ok = tmp_path / "plan.json"
    ok.write_text('{"a": 1}')
    assert read_bounded_text(str(ok), 100, "plan file") == '{"a": 1}'
    with pytest.raises(ValueError, match=r"plan.json: larger than 4 bytes, the limit for a plan file"):
        read_bounded_text(str(ok), 4, "plan file")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # no writer: opening must not block
    for special in (str(fifo), "/dev/zero"):
        with pytest.raises(ValueError, match="not a regular file"):
            read_bounded_text(special, 100, "plan file")
    with pytest.raises(FileNotFoundError, match="nope.json: no such plan file"):
        read_bounded_text(str(tmp_path / "nope.json"), 100, "plan file")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_bounded_text(str(tmp_path), 100, "plan file")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        read_bounded_text(str(tmp_path / "bin.json"), 100, "plan file")


def test_extends_bounded_in_breadth_a_base_listed_again_and_again_is_refused_fast(tmp_path):
    """Depth 8 and 20 bases per file would read 20**8 files; the total-files bound stops it."""
    (tmp_path / "l0.yaml").write_text("cpu: {threads: 1}\n")
    for level in range(1, 8):
        bases = ", ".join([f"l{level - 1}.yaml"] * 20)
        (tmp_path / f"l{level}.yaml").write_text(f"extends: [{bases}]\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "l7.yaml"))
    assert time.perf_counter() - start < 1.0
    assert "reads more than 64 files" in str(info.value) and "list each base once" in str(info.value)
    (tmp_path / "ok.yaml").write_text("extends: [l0.yaml, l0.yaml]\n")  # a few repeats still load
    assert load_config(str(tmp_path / "ok.yaml")) is not None
