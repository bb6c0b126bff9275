"""``pqa bench [--quick]``: run the benchmarks in the source checkout's ``bench/`` folder.

``bench/`` is not installed with the package: it is found next to this package's folder
(``<repo>/experiments/../bench``, which is where an editable install points), or at
``$PQA_BENCH_DIR``. The main CLI mounts it with ``cli.add_command(bench)``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from pqa_core.errors import UsageError


def bench_dir() -> Path:
    """The ``bench/`` folder: ``$PQA_BENCH_DIR`` or the one beside this package in a source checkout."""
    configured = os.environ.get("PQA_BENCH_DIR")
    path = Path(configured) if configured else Path(__file__).resolve().parents[2] / "bench"
    if not (path / "run.py").is_file():
        raise UsageError(f"no benchmarks at {path} (bench/run.py): `pqa bench` runs from a source checkout "
                         f"(pip install -e .) or with PQA_BENCH_DIR set to its bench/ folder")
    return path


def load_driver():
    """Import ``bench.run`` from the checkout (its parent folder goes first on ``sys.path``)."""
    root = str(bench_dir().resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    import importlib

    return importlib.import_module("bench.run")


@click.command("bench")
@click.option("--quick", is_flag=True, help="The fast subset (a few minutes); results in bench/results/quick/.")
@click.option("--only", multiple=True, metavar="NAME",
              help="Run just this benchmark (repeatable): one of bench/run.py's BENCHMARKS (c), (d), (e), (g) "
                   "below; a wrong name lists them.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="Torch/faiss threads; 0 keeps torch's default (1 is steadier on a shared machine).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default bench/results, or bench/results/quick).")
@click.option("--smoke", is_flag=True, hidden=True, help="Tiny sizes, seconds (for tests).")
def bench(quick, only, threads, out, smoke):
    """Measure pqa against its baselines; every figure is a ratio timed side by side.

    \b
    (c) read-phase training step vs a bare HF step of the same LLM (goal <= 1.15)
    (d) top-k selection over 10^4..10^6 doc vectors vs the matmul peak (goal >= 60%),
        and a faiss IVF index: recall@10 vs exact (goal >= 0.95) and its speedup
    (e) the same pqa run with and without the MongoDB observer (goal <= 1.03)
    (g) batched evaluation vs the seed's per-question loop padded to 128 (goal >= 10x)

    Writes <out>/<name>.json, .md, a PNG, SUMMARY.md; results written to bench/results also
    rebuild bench/RESULTS.md from every result file there ((a), (b), (f) come from their own
    scripts: python bench/quality.py, latency.py, write_capacity.py).
    """
    driver = load_driver()
    unknown = [name for name in only if name not in driver.BENCHMARKS]
    if unknown:
        raise UsageError(f"unknown benchmark {unknown[0]!r}; known: {', '.join(driver.BENCHMARKS)}")
    profile = "smoke" if smoke else "quick" if quick else "full"
    command = "pqa bench" + "".join(
        [" --quick" if quick else "", " --smoke" if smoke else ""] + [f" --only {name}" for name in only]
        + ([f" --threads {threads}"] if threads != 1 else []) + ([f" --out {out}"] if out else []))
    driver.run_all(profile, only=list(only) or None, threads=threads, out_dir=out, command=command,
                   log=lambda line: click.echo(line, err=True))
