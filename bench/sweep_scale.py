"""(j) A sweep on Ray against the same trials run one after another.

Eight trials of the tiny model (the ``smoke`` named config with short phases; a grid of 2 x 2 x 2
values), recorded to an embedded SecantusDB daemon started for the benchmark in a temporary folder:

- ``sweep``: ``pqa sweep SPEC --workers 2`` (a local Ray instance with two workers, Ray's start-up and
  shut-down included);
- ``one_after_another``: the same eight trials as eight ``pqa run pipeline`` commands, each after the
  previous one (what a shell loop does).

Checked: every trial of the sweep is stored as a COMPLETED run tagged with the sweep id, and the
sweep's metrics equal the loop's trial by trial. Goal: every trial stored; the wall-time ratio is
reported (two workers on the cores this benchmark may use).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

NAME = "sweep_scale"
SHARED = ["smoke", "write.epochs=1", "write.eval_docs=0", "read.eval_every=0", "eval.max_new_tokens=2"]
GRID = {"read.top_k": [1, 2], "selector.temperature": [0.05, 0.1], "read.lr_z": [1e-4, 1e-3]}
PROFILES = {
    "smoke": dict(workers=2, grid={"read.top_k": [1, 2]}, rounds=1),
    "quick": dict(workers=2, grid=GRID, rounds=1),
    "full": dict(workers=2, grid=GRID, rounds=1),
}


def _pqa(args, env):
    proc = subprocess.run([sys.executable, "-m", "pqa_experiments.cli.main", *args], capture_output=True, text=True,
                          env=env)
    return proc


@common.isolated
def run(profile: str = "quick", command: str | None = None, threads: int | None = common.DEFAULT_THREADS,
        **overrides) -> dict:
    import pymongo

    from pqa_experiments.store import db
    from pqa_experiments.sweeps.spec import parse_spec

    from bench.tracking_overhead import free_port

    bench = common.Bench(NAME, profile, PROFILES, overrides, threads, command)
    params = bench.params
    spec_data = {"experiment": "pipeline", "with": SHARED + [f"threads={bench.threads or 1}"],
                 "grid": params["grid"], "metric": "Recall@1"}
    trials = parse_spec(spec_data).trials()
    with tempfile.TemporaryDirectory(prefix="pqa-bench-sweep-") as tmp:
        home = Path(tmp) / "home"
        url = db.ensure_running(data_dir=home, port=free_port()).rstrip("/")
        target = f"{url}/pqa_bench_sweep"
        env = dict(os.environ, PQA_PROGRESS="0", PQA_HOME=str(home), PQA_OUTPUT_DIR=str(Path(tmp) / "outputs"))
        spec = Path(tmp) / "sweep.json"  # JSON is YAML
        spec.write_text(json.dumps(spec_data))
        sweeps, loops = [], []
        try:
            def sweep():
                t0 = time.perf_counter()
                proc = _pqa(["sweep", str(spec), "--workers", str(params["workers"]), "--mongo-url", target, "--json"],
                            env)
                wall = time.perf_counter() - t0
                done = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
                sweeps.append({"wall_s": wall, "exit": proc.returncode, "sweep_id": done.get("sweep_id"),
                               "status": done.get("status"), "trials": done.get("trials", [])})

            def one_after_another():
                t0 = time.perf_counter()
                results = []
                for trial in trials:
                    proc = _pqa(["run", "pipeline", "--mongo-url", target, "--json", "with", *trial.items], env)
                    results.append(json.loads(proc.stdout.strip().splitlines()[-1])["result"]
                                   if proc.returncode == 0 else None)
                loops.append({"wall_s": time.perf_counter() - t0, "results": results})

            times = common.interleaved({"sweep": sweep, "one_after_another": one_after_another},
                                       rounds=params["rounds"], warmup=0)
            with pymongo.MongoClient(url, serverSelectionTimeoutMS=10_000) as client:
                runs = client["pqa_bench_sweep"]["runs"]
                for s in sweeps:
                    s["stored"] = runs.count_documents({"info.sweep.id": s["sweep_id"], "status": "COMPLETED"})
        finally:
            db.stop(data_dir=home)
    same = all(t["result"] == loops[0]["results"][t["trial"]] for s in sweeps for t in s["trials"])
    stored = all(s["stored"] == len(trials) and s["exit"] == 0 for s in sweeps)
    ratio = common.ratio_stats(times["one_after_another"], times["sweep"])
    return bench.finish({
        "setup": {"trials": len(trials), "workers": params["workers"], "spec": spec_data,
                  "usable_cpus": len(os.sched_getaffinity(0))},
        "seconds": times, "sweeps": sweeps, "loops": [{"wall_s": lp["wall_s"]} for lp in loops],
        "same_results": same, "speedup": ratio,
        "goal": {"metric": f"a sweep of {len(trials)} tiny trials on {params['workers']} workers: every trial stored",
                 "target": f"{len(trials)} of {len(trials)}", "value": min(s["stored"] for s in sweeps),
                 "met": stored},
    })


def markdown(result: dict) -> str:
    s, t, r = result["setup"], result["seconds"], result["speedup"]
    rows = [[f"`pqa sweep` on a local Ray instance, {s['workers']} workers", f"{common.median(t['sweep']):.0f}"],
            [f"{s['trials']} x `pqa run pipeline`, one after another", f"{common.median(t['one_after_another']):.0f}"]]
    stored = ", ".join(f"{x['stored']} of {s['trials']}" for x in result["sweeps"])
    return common.section(
        "(j) A sweep on Ray against a loop", result,
        f"{s['trials']} trials of the tiny model: `with {' '.join(s['spec']['with'])}` and the grid "
        f"`{json.dumps(s['spec']['grid'])}`, recorded to an embedded SecantusDB daemon; "
        f"{result['params']['rounds']} round(s), the two sides interleaved.",
        common.md_table(["", "wall seconds"], rows),
        f"Trials stored as COMPLETED runs tagged with the sweep: **{stored}** "
        f"({common.verdict(result['goal']['met'])}); metrics trial by trial "
        f"{'equal to the loop' if result['same_results'] else 'NOT equal to the loop'}. Loop time / sweep time: "
        f"**{r['ratio_of_medians']:.2f}**. With {s['usable_cpus']} usable core(s) two workers share them: the sweep "
        f"gains only where a trial waits (start-up, loading); Ray's own start (a few seconds) is in its time.")


def main(argv=None) -> int:
    return common.script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
