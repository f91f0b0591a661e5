"""docker/: hadolint-clean, the NGC base and its stack left alone, every install step in
docker/install.sh (which the Dockerfile RUNs and docs/guide.md's "Docker image" section documents).
No Docker engine is needed."""

from __future__ import annotations

import fnmatch
import re
import subprocess

import pytest

from tests.launch_fakes import REPO, linter

DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()
INSTALL = (REPO / "docker" / "install.sh").read_text()
IMPORT_CHECK = 'RUN python -c "import megatron.core, transformer_engine, megatron_c2r"'
SUPPORTED_NGC = ("25.09", "26.06")  # Megatron-LM's LTS and dev images (REFERENCE.md section 6)


def _instructions():
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip()]


def test_dockerfile_is_hadolint_clean():
    result = subprocess.run([linter("hadolint"), "docker/Dockerfile"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_is_an_ngc_pytorch_image_whose_tag_is_a_build_arg_megatron_supports():
    steps = _instructions()
    assert steps[0][0] == "ARG" and steps[1][0] == "FROM"
    name, default = steps[0][1].split("=")
    assert default in SUPPORTED_NGC
    assert steps[1][1] == f"nvcr.io/nvidia/pytorch:${{{name}}}-py3"


def test_every_build_arg_reaches_install_sh_and_the_build_fails_unless_the_stack_imports():
    steps = _instructions()
    args = [a.split("=")[0] for op, a in steps[2:] if op == "ARG"]
    (run_install,) = [a for op, a in steps if op == "RUN" and "docker/install.sh" in a]
    for arg in args:
        assert f'{arg}="${{{arg}}}"' in run_install and f"${{{arg}:-" in INSTALL, arg
    assert ("COPY", "docker/install.sh ./docker/install.sh") in steps
    assert ("RUN", IMPORT_CHECK.removeprefix("RUN ")) in steps
    assert "MEGATRON_LM_PATH=/opt/Megatron-LM" in DOCKERFILE  # what configs/ point at


def test_install_sh_never_reinstalls_torch_transformer_engine_or_nccl():
    code = [l for l in INSTALL.splitlines() if not l.lstrip().startswith("#")]
    pip_lines = [l for l in code if "pip" in l and "install" in l]
    assert pip_lines == ["PIP=(python -m pip install --no-cache-dir --no-deps --no-build-isolation)"]
    for line in code:
        assert not re.search(r"\bpip\b.*\buninstall\b|PIP_CONSTRAINT=|unset PIP_CONSTRAINT", line), line
        if '"${PIP[@]}"' in line:
            assert not re.search(r"\b(torch|transformer[-_]engine|nccl)\b", line), line
    assert '[[ $BEFORE == "$AFTER" ]]' in INSTALL  # and the versions are compared after
    assert 'git clone --depth 1 --branch "$MEGATRON_LM_TAG"' in INSTALL
    assert 'MEGATRON_LM_TAG=${IMAGE_MCORE:+core_v$IMAGE_MCORE}' in INSTALL  # the image's own core
    assert 'python -c "import apex"' in INSTALL and "INSTALL_APEX" in INSTALL


def test_dockerignore_keeps_exactly_what_the_dockerfile_copies():
    rules = [l for l in (REPO / ".dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert rules[0] == "**"  # start from nothing: no .git, venv, runs/, checkpoints/ in the context

    def kept(path):
        keep = True
        for rule in rules:
            negate, pattern = rule.startswith("!"), rule.lstrip("!")
            if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.rstrip("*").rstrip("/")):
                keep = negate
        return keep

    sources = [a.split()[0] for op, a in _instructions() if op == "COPY"]
    for source in sources:
        inside = f"{source}/x.py" if (REPO / source).is_dir() else source
        assert kept(inside), source
    for junk in ("venv/bin/python", ".git/HEAD", "runs/x/metrics.csv", "megatron_c2r/__pycache__/a.pyc"):
        assert not kept(junk), junk


def _readme_docker_section():
    readme = (REPO / "docs" / "guide.md").read_text()  # the README links there
    match = re.search(r"^## Docker image\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    if match is None:
        pytest.fail("docs/guide.md has no '## Docker image' section")
    return match.group(1)


def test_readmes_docker_section_builds_this_dockerfile_with_its_args_and_names_install_sh():
    section = _readme_docker_section()
    blocks = "\n".join(re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", section, re.S))
    assert "docker build -f docker/Dockerfile" in blocks
    assert "docker/install.sh" in section
    declared = {a.split("=")[0] for op, a in _instructions() if op == "ARG"}
    assert set(re.findall(r"--build-arg (\w+)=", blocks)) <= declared
    assert "--container-image=" in blocks  # how to run it with pyxis
