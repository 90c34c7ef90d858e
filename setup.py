"""Build script for rasa-megatron.

The CUDA extension in csrc/ is built only when CUDA is available (or RASA_FORCE_BUILD=1);
RASA_SKIP_CUDA_BUILD=1 skips it. Without it the pure-PyTorch path in rasa_megatron.functional runs.
"""
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
]

EXTRAS = {
    "deepspeed": ["deepspeed>=0.16"],
    "megatron": ["megatron-core>=0.12"],
    "eval": ["lm-eval>=0.4.5"],
    "dev": ["pytest>=8", "pytest-timeout"],
}

setup(
    name="rasa-megatron",
    version="0.1.0",
    description="RaSA (Rank-Sharing Low-Rank Adaptation) for Hugging Face, DeepSpeed and Megatron-core",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["rasa_megatron", "rasa_megatron.*"]),
    install_requires=CORE_REQUIRES,
    extras_require=EXTRAS,
)
