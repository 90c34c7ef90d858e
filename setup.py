"""Build script for rasa-megatron: a pure-Python package (``rasa_megatron``) with its console scripts.

Nothing is compiled: ``csrc/`` holds no kernel yet, and every path runs the PyTorch math of
``rasa_megatron/functional.py``. (``RASA_SKIP_CUDA_BUILD``, set by tools/env.sh, has nothing to skip today.)
"""
import os

from setuptools import find_packages, setup

CORE_REQUIRES = [
    "torch>=2.4",
    "transformers>=5.0",
    "safetensors>=0.4",
    "peft>=0.17",
    "datasets>=3.0",
    "numpy",
    "tqdm",
    "pyyaml",
    "matplotlib",
    "gguf>=0.10",
    "lion-pytorch>=0.2",
    "psutil",
]

EXTRAS = {
    "deepspeed": ["deepspeed>=0.16"],
    "megatron": ["megatron-core>=0.12"],
    "eval": ["lm-eval>=0.4.5"],
    "dev": ["pytest>=8", "pytest-timeout"],
}

CONSOLE_SCRIPTS = [
    "rasa-train = rasa_megatron.cli.train:main",
    "rasa-export = rasa_megatron.cli.export:main",
    "rasa-convert = rasa_megatron.cli.convert:main",
    "rasa-memory = rasa_megatron.cli.memory:main",
    "rasa-reconstruction = rasa_megatron.cli.reconstruction:main",
]

setup(
    name="rasa-megatron",
    version="0.1.0",
    description="RaSA (Rank-Sharing Low-Rank Adaptation) for Hugging Face, DeepSpeed and Megatron-core",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["rasa_megatron", "rasa_megatron.*"]),
    install_requires=CORE_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)
