"""What every benchmark shares: the machine description, interleaved timing, result files.

Every figure a benchmark reports is a ratio of two (or more) things timed side by side in one
process: round r runs A, B, ... then the next round runs them in reverse order, so a slow
period on a shared machine hits both sides alike. Medians over rounds are reported, with
the spread of the per-round ratios.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from pqa_core.storage.atomic import write_atomic

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"


def _squad_dir() -> Path:
    """``shared/data/squad_v1.1`` beside the checkout (``../shared``), or beside the folder of worktrees
    it may sit in (``../../shared``); ``$PQA_SQUAD_DIR`` wins."""
    if os.environ.get("PQA_SQUAD_DIR"):
        return Path(os.environ["PQA_SQUAD_DIR"])
    candidates = [root / "shared" / "data" / "squad_v1.1" for root in (REPO_ROOT.parent, REPO_ROOT.parent.parent)]
    return next((c for c in candidates if c.is_dir()), candidates[0])


SQUAD_DIR = _squad_dir()


def squad_passages(n: int, where: str):
    """``n`` passages of shared/data's SQuAD corpus (``where``: ``first``, bench (a)'s articles, never in a
    pretraining corpus; or ``last``), else of the shipped sample; and a line saying which."""
    from pqa_core.data.loading import load_corpus, sample_data_path

    squad = SQUAD_DIR / "corpus.jsonl"
    corpus = load_corpus(squad if squad.exists() else sample_data_path("corpus.jsonl"))
    chosen = corpus[:n] if where == "first" else corpus[-n:]
    if not squad.exists():
        return chosen, "the shipped sample"
    return chosen, ("SQuAD v1.1 (the first passages of shared/data: bench (a)'s)" if where == "first"
                    else "SQuAD v1.1 (the last passages of shared/data)")


def default_out(profile: str) -> Path:
    """Where a profile's results go: ``bench/results`` (full, the files RESULTS.md is built from), else
    ``bench/results/<profile>``."""
    return DEFAULT_OUT if profile == "full" else DEFAULT_OUT / profile


def _lscpu() -> Dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {}
    for line in text.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            out[key.strip()] = value.strip()
    return out


def _memory_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


DEFAULT_THREADS = 1
"""Torch threads the benchmarks use unless told otherwise. One, because this machine is shared: with
other processes on the cores, a 2-thread OpenMP op waits at every barrier for a descheduled thread
(measured here: a SmolLM2 training step took 8-28 s with 2 threads against a steady 2.2 s with 1).
``--threads 0`` keeps torch's default."""


def set_threads(threads: Optional[int]) -> int:
    """Use ``threads`` torch threads (0 or None: torch's default); returns the number in force."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def machine_info() -> dict:
    """CPU model, cores, torch threads, library versions, load average: what a number depends on."""
    import torch

    cpu = _lscpu()
    flags = cpu.get("Flags", "").split()
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count()
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "faiss", "numpy"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except ImportError:
            versions[name] = None
    return {
        "cpu_model": cpu.get("Model name") or platform.processor() or "unknown",
        "cpu_vendor": cpu.get("Vendor ID"),
        "hypervisor": cpu.get("Hypervisor vendor"),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "simd": simd,
        "memory_gib": _memory_gib(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "platform": platform.platform(),
        "versions": versions,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def machine_line(machine: dict) -> str:
    """One markdown line describing the machine."""
    v = machine["versions"]
    return (f"{machine['cpu_model']} ({machine.get('cpu_vendor') or '?'}"
            f"{', ' + machine['hypervisor'] + ' VM' if machine.get('hypervisor') else ''}), "
            f"{machine['usable_cpus']} usable cores, torch threads {machine['torch_threads']}, "
            f"{'/'.join(machine['simd']) or 'no AVX'}, {machine['memory_gib']} GiB RAM, "
            f"torch {v['torch']}, transformers {v.get('transformers')}, "
            f"load average at start {machine['loadavg_at_start'][0]} (other processes share this machine)")


def interleaved(fns: Dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Wall seconds of each callable, ``rounds`` times, alternating order A,B,.. / ..,B,A per round."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio_stats(numerator: Sequence[float], denominator: Sequence[float]) -> dict:
    """Ratio of medians, plus median/min/max of the per-round ratios (the noise)."""
    per_round = [a / b for a, b in zip(numerator, denominator)]
    return {"ratio_of_medians": median(numerator) / median(denominator),
            "per_round_median": median(per_round), "per_round_min": min(per_round), "per_round_max": max(per_round)}


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(result: dict, markdown: Optional[str], out_dir) -> Dict[str, str]:
    """``out_dir/<name>.json`` and ``out_dir/<name>.md`` (the JSON alone when ``markdown`` is None), each
    written under a temporary name first."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    texts = [("json", json.dumps(result, indent=2, default=_jsonable) + "\n")]
    texts += [("md", markdown + "\n")] if markdown is not None else []
    for ext, text in texts:
        paths[ext] = str(write_atomic(out / f"{result['name']}.{ext}", text))
    return paths


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def command_line(default: str) -> str:
    """The command that produced a result: ``PQA_BENCH_COMMAND`` (set by the driver) or ``default``."""
    return os.environ.get("PQA_BENCH_COMMAND") or default


def script_command(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """The command as a shell takes it back (arguments with spaces or quotes quoted)."""
    import shlex

    argv = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", f"bench/{script}"] + argv)


def quiet_libraries() -> None:
    """No progress bars or HF info chatter inside timed code."""
    import logging

    os.environ.setdefault("PQA_PROGRESS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "peft", "pqa_core"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def isolated(run):
    """Decorator for a benchmark's ``run``: afterwards torch threads, the environment variables and the
    logging settings that :func:`quiet_libraries` and :func:`set_threads` change are as they were
    (so a test or a notebook that runs a benchmark in-process is left untouched)."""
    import functools
    import logging

    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        import torch

        threads = torch.get_num_threads()
        env = {k: os.environ.get(k) for k in ("PQA_PROGRESS", "TOKENIZERS_PARALLELISM")}
        levels = {n: logging.getLogger(n).level for n in ("transformers", "peft", "pqa_core")}
        try:
            from transformers.utils import logging as hf_logging

            hf_state = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
        except ImportError:  # pragma: no cover
            hf_logging, hf_state = None, None
        try:
            return run(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
            for k, v in env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)
            if hf_logging is not None:
                hf_logging.set_verbosity(hf_state[0])
                (hf_logging.enable_progress_bar if hf_state[1] else hf_logging.disable_progress_bar)()

    return wrapper


def header(result: dict) -> str:
    """The lines every benchmark section starts with: command, machine, wall time."""
    return (f"Command: `{result['command']}`  \n"
            f"Machine: {machine_line(result['machine'])}  \n"
            f"Profile: {result['profile']}; this benchmark's wall time {result['wall_s']:.0f} s"
            f"{' (its ' + str(result['combined_from']) + ' parts summed)' if result.get('combined_from') else ''}; "
            f"load average at end {result.get('loadavg_at_end', ['?'])[0]}")


class Bench:
    """What every benchmark's ``run`` starts and ends with.

    Starting: quiet libraries, the profile's parameters (with ``overrides``), torch threads, the
    machine description; ``finish`` puts the fields every result starts with (name, profile, command,
    machine, params) before the benchmark's own and adds its wall time and the load average at the end.
    """

    def __init__(self, name: str, profile: str, profiles: dict, overrides: dict, threads: Optional[int],
                 command: Optional[str]):
        quiet_libraries()
        self.name, self.profile = name, profile
        self.params = {**profiles[profile], **overrides}
        self.started = time.perf_counter()
        self.threads = set_threads(threads)
        self.machine = machine_info()
        self.command = command or command_line(f"python bench/{name}.py --{profile}")

    def head(self) -> dict:
        return {"name": self.name, "profile": self.profile, "command": self.command, "machine": self.machine,
                "params": self.params}

    def finish(self, fields: dict) -> dict:
        result = {**self.head(), **fields}
        result["wall_s"] = time.perf_counter() - self.started
        result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        return result


def memory_gib() -> Dict[str, Optional[float]]:
    """This process's peak (``VmHWM``) and current resident memory (GiB), the current split into file pages
    and anonymous; ``None`` where /proc is missing."""
    fields: Dict[str, float] = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    fields[key] = int(value.split()[0]) / 2 ** 20
    except OSError:
        pass
    return {"peak_gib": fields.get("VmHWM"), "rss_gib": fields.get("VmRSS"), "anon_gib": fields.get("RssAnon"),
            "file_gib": fields.get("RssFile")}


def reset_peak_memory() -> bool:
    """Start a new peak (``VmHWM``) from the current resident memory, so one process can measure the peak
    of each of its parts (Linux: ``/proc/self/clear_refs``); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def verdict(met) -> str:
    return "met" if met else "NOT met"


def span(low: float, high: float, fmt: str = ".2f") -> str:
    """A per-round range as the tables print it: ``low .. high``."""
    return f"{low:{fmt}} .. {high:{fmt}}"


def ratio_span(stats: dict, fmt: str = ".2f") -> str:
    """The range of the per-round ratios of :func:`ratio_stats`."""
    return span(stats["per_round_min"], stats["per_round_max"], fmt)


def section(title: str, result: dict, *blocks: str) -> str:
    """A benchmark's markdown: ``## title``, the :func:`header` lines, then the blocks, one blank line apart."""
    return "\n\n".join([f"## {title}", header(result), *blocks])


def script_main(module, argv=None, add_arguments=None, run_kwargs=None, refresh=None) -> int:
    """The command line every benchmark script shares::

        python bench/<name>.py [--quick | --full | --smoke] [--threads N] [--out DIR] [--render-only]

    Runs ``module.run`` (or, with ``--render-only``, reads the stored JSON back), writes
    ``<out>/<name>.json`` and ``.md`` and prints the markdown. A result written to ``bench/results``
    (the full profile's default folder) also re-renders ``bench/RESULTS.md`` from every result file
    there, so every other section is kept. ``add_arguments(parser)`` adds a script's own options,
    ``run_kwargs(args, out)`` turns them into keyword arguments of ``run``; ``refresh(result, args)``
    updates a stored result before ``--render-only`` renders it (what it reads from other results).
    """
    import argparse

    parser = argparse.ArgumentParser(description=module.__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(module.PROFILES), default="full")
    for profile in ("quick", "full", "smoke"):
        if profile in module.PROFILES:
            parser.add_argument(f"--{profile}", action="store_const", const=profile, dest="profile")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="torch threads, faiss's too where used (0: torch's default)")
    parser.add_argument("--out", default=None, help="folder for the JSON, markdown and PNG "
                                                    "(default bench/results, or bench/results/<profile>)")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: rewrite the markdown (and RESULTS.md) from the stored JSON")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else default_out(args.profile)
    if args.render_only:
        result = json.loads((out / f"{module.NAME}.json").read_text(encoding="utf-8"))
        if refresh is not None:
            result = refresh(result, args)
    else:
        result = module.run(args.profile, threads=args.threads,
                            command=command_line(script_command(f"{module.NAME}.py", argv)),
                            **(run_kwargs(args, out) if run_kwargs is not None else {}))
    if not args.render_only or refresh is not None:  # the measurement is kept even if rendering it fails
        write_result(result, None, out)
    md = module.markdown(result)
    write_result(result, md, out)
    if out.resolve() == DEFAULT_OUT.resolve():
        from bench import run as driver

        driver.rerender(out)
    print(md)
    return 0
