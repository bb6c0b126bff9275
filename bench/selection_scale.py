"""(d) Selection at scale: top-k over N doc vectors, achieved FLOP/s against this machine's matmul peak,
and an approximate (faiss IVF) index for large N: recall@10 against exact search, and its speedup.

For each N, in interleaved rounds: a square fp32 ``torch.mm`` (the peak), and the selection of
B=64 queries, d=384: ``scores = q @ Z.T`` then ``topk(10)``, in four forms:

- ``matmul``: the scores alone (no top-k), the ceiling for the rest;
- ``exact_topk``: full ``[B, N]`` scores then ``topk``, what ``ParametricQA.select_documents`` does with
  the ``dot`` selector;
- ``chunked_topk``: scores and top-k over blocks of Z rows, then a top-k of the block winners
  (same result; the ``[B, N]`` score matrix never exists);
- ``cosine_topk``: pqa's default ``cosine`` selector as it is: the doc vectors need no gradient here,
  so it normalises them once and reuses the normalised matrix while they are unchanged;
- ``cosine_renorm_topk``: the same selector with its cache emptied before every call, so it normalises
  all N doc vectors each time (what it did before the cache, and still does when gradients flow to
  the doc vectors in training).

Useful work is ``2*B*N*d`` FLOP in every form; efficiency = achieved FLOP/s / peak FLOP/s of the
same round. Goal: >= 60% for exact top-k selection.

faiss (``pip install faiss-cpu``; skipped with a message when missing): ``IndexIVFFlat`` with inner
product on L2-normalised vectors, nlist = 4*sqrt(N) rounded to a power of two (at most 2048, to keep
the build in about a minute), k-means trained on 64*nlist rows. Recall@10 = |ANN top-10 ∩ exact
top-10| / 10 over the recall queries; speedup = exact ``topk`` time / faiss search time for the
same B=64 queries, interleaved. Building uses all cores and is not part of the ratio.

The vectors are synthetic, shaped after all-MiniLM-L6-v2 embeddings of SQuAD (measured on 300
passages and 300 questions of shared/data/squad_v1.1: passages of one article have mean cosine
0.40; a question has cosine 0.57 with its passage; an article has ~43 passages): unit vectors
around N/40 random "article" centres with spread 1.22 (cosine 1/(1+1.22^2) = 0.40 inside a group).
Three query sets:

- ``clustered``: new members of the groups, drawn like the documents (the usual ANN benchmark set-up,
  queries from the data distribution): their neighbours are their group. The goal is read here.
- ``question-like``: a random document plus noise 1.44 (cosine 0.57 with it, as a SQuAD question with
  its passage). With isotropic noise in 384 dimensions the rest of the exact top-10 is chance: documents
  of unrelated groups whose random cosine happens to be high, scattered over all IVF lists.
- ``uniform``: uniform random unit vectors and queries; nothing to prune, the worst case.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

NAME = "selection_scale"
GOAL_EFFICIENCY = 0.60
GOAL_RECALL = 0.95
PROFILES = {
    "smoke": dict(sizes=[2_000], batch=8, dim=32, k=10, rounds=2, warmup=1, peak_n=256, chunk=512,
                  ann=[("clustered", 2_000)], nprobes=[2, 8], recall_queries=16),
    "quick": dict(sizes=[10_000, 100_000], batch=64, dim=384, k=10, rounds=7, warmup=1, peak_n=1024, chunk=16_384,
                  ann=[("clustered", 100_000)], nprobes=[2, 4, 8, 16, 32], recall_queries=256),
    "full": dict(sizes=[10_000, 100_000, 1_000_000], batch=64, dim=384, k=10, rounds=7, warmup=1, peak_n=1536,
                 chunk=16_384, ann=[("clustered", 100_000), ("clustered", 1_000_000), ("question-like", 100_000),
                                    ("uniform", 100_000)],
                 nprobes=[2, 4, 8, 16, 32, 64, 128], recall_queries=512),
}
DOCS_PER_CENTRE = 40  # ~43 passages per SQuAD article
SPREAD = 1.22  # same-centre cosine 1/(1+s^2) = 0.40, as MiniLM gives passages of one SQuAD article
QUERY_NOISE = 1.44  # question-passage cosine 1/sqrt(1+t^2) = 0.57, as MiniLM gives a SQuAD question and its passage


# ---------------------------------------------------------------- data

def clustered_unit_vectors(n: int, dim: int, seed: int, per_centre: int = DOCS_PER_CENTRE, spread: float = SPREAD):
    """``[n, dim]`` unit vectors: one of ``n / per_centre`` random centres + ``spread`` x a random unit
    direction, normalised."""
    import torch

    g = torch.Generator().manual_seed(seed)
    c = torch.nn.functional.normalize(torch.randn(max(1, n // per_centre), dim, generator=g), dim=-1)
    out = torch.empty(n, dim)
    step = 65_536
    for start in range(0, n, step):
        stop = min(start + step, n)
        assign = torch.randint(0, c.shape[0], (stop - start,), generator=g)
        noise = torch.nn.functional.normalize(torch.randn(stop - start, dim, generator=g), dim=-1)
        out[start:stop] = torch.nn.functional.normalize(c[assign] + spread * noise, dim=-1)
    return out


def uniform_unit_vectors(n: int, dim: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)


def queries_near(z, count: int, seed: int, noise: float = QUERY_NOISE):
    """Noisy copies of ``count`` random rows of ``z`` (a question near its passage), normalised."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, z.shape[0], (count,), generator=g)
    jitter = torch.nn.functional.normalize(torch.randn(count, z.shape[1], generator=g), dim=-1)
    return torch.nn.functional.normalize(z[rows] + noise * jitter, dim=-1)


# ---------------------------------------------------------------- selection forms

def exact_topk(q, z, k: int):
    return (q @ z.T).topk(k, dim=-1)


def chunked_topk(q, z, k: int, chunk: int):
    """Top-k of ``q @ z.T`` computed block by block; same values as :func:`exact_topk`."""
    import torch

    values, indices = [], []
    for start in range(0, z.shape[0], chunk):
        block = q @ z[start:start + chunk].T
        v, i = block.topk(min(k, block.shape[1]), dim=-1)
        values.append(v)
        indices.append(i + start)
    values, indices = torch.cat(values, dim=1), torch.cat(indices, dim=1)
    best_v, best = values.topk(k, dim=-1)
    return best_v, indices.gather(1, best)


# ---------------------------------------------------------------- faiss

def _faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return None
    return faiss


def build_ivf(faiss, z, nlist: int, seed: int = 0):
    """IVF-Flat, inner product; k-means trained on at most 64*nlist rows."""
    import numpy as np

    data = np.ascontiguousarray(z.numpy(), dtype="float32")
    quantizer = faiss.IndexFlatIP(data.shape[1])
    index = faiss.IndexIVFFlat(quantizer, data.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample = data if data.shape[0] <= 64 * nlist else data[rng.choice(data.shape[0], 64 * nlist, replace=False)]
    index.cp.seed = seed
    index.train(sample)
    index.add(data)
    return index


def recall_at_k(approx, exact) -> float:
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact))
    return hits / float(exact.shape[0] * exact.shape[1])


def _nlist(n: int) -> int:
    """4*sqrt(N) as a power of two, at most 2048 and at most N/39 (faiss wants 39 training rows per list)."""
    nlist = min(2 ** round(math.log2(4 * math.sqrt(n))), 2048)
    while nlist > 4 and nlist * 39 > n:
        nlist //= 2
    return int(nlist)


def ann_dataset(kind: str, n: int, dim: int, count: int):
    """(documents [n, dim], queries [count, dim]) for one of the three query sets."""
    if kind == "clustered":
        both = clustered_unit_vectors(n + count, dim, seed=n)  # queries: held-out members of the same groups
        return both[:n].contiguous(), both[n:].contiguous()
    if kind == "question-like":
        z = clustered_unit_vectors(n, dim, seed=n)
        return z, queries_near(z, count, seed=n + 2)
    if kind == "uniform":
        return uniform_unit_vectors(n, dim, seed=n), uniform_unit_vectors(count, dim, seed=n + 2)
    raise ValueError(f"unknown ANN data set {kind!r}")


def faiss_rows(faiss, z, queries, params, dataset: str, threads: int):
    """One row per nprobe: recall@10 and the interleaved speedup over exact torch top-k."""
    import numpy as np
    import torch

    k, B = params["k"], params["batch"]
    nlist = _nlist(z.shape[0])
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    index = build_ivf(faiss, z, nlist)
    build_s = time.perf_counter() - started
    faiss.omp_set_num_threads(max(threads, 1))
    exact = chunked_topk(queries, z, k, params["chunk"])[1]
    q_np = np.ascontiguousarray(queries.numpy(), dtype="float32")
    q_batch = q_np[:B]
    q_batch_t = queries[:B].contiguous()
    rows = []
    for nprobe in params["nprobes"]:
        if nprobe > nlist:
            continue
        index.nprobe = nprobe
        _, approx = index.search(q_np, k)
        recall = recall_at_k(torch.from_numpy(approx), exact)
        times = common.interleaved({"exact_topk": lambda: exact_topk(q_batch_t, z, k),
                                    "faiss": lambda: index.search(q_batch, k)},
                                   rounds=params["rounds"], warmup=params["warmup"])
        speed = common.ratio_stats(times["exact_topk"], times["faiss"])
        rows.append({"dataset": dataset, "N": int(z.shape[0]), "nlist": nlist, "nprobe": nprobe,
                     "recall_at_10": recall, "exact_ms": common.median(times["exact_topk"]) * 1000,
                     "faiss_ms": common.median(times["faiss"]) * 1000, "speedup": speed["ratio_of_medians"],
                     "speedup_range": [speed["per_round_min"], speed["per_round_max"]], "build_s": build_s,
                     "seconds": times})
    del index
    return rows


# ---------------------------------------------------------------- run

FORMS = ("matmul", "exact_topk", "chunked_topk", "cosine_topk", "cosine_renorm_topk")


def scale_row(n: int, flop: float, peak_flop: float, times: dict) -> dict:
    """Summary of one N from the raw per-round seconds: efficiency = median FLOP/s / median peak FLOP/s
    (the ratio of the two medians, as the table's columns), with the per-round ratios' range as noise."""
    peak = peak_flop / common.median(times["peak_mm"])
    row = {"N": n, "flop": flop, "peak_flop": peak_flop, "peak_gflops": peak / 1e9, "variants": {}, "seconds": times}
    scale = flop / peak_flop
    for name in (f for f in FORMS if f in times):  # results stored before a form existed lack it
        eff = common.ratio_stats(times["peak_mm"], times[name])  # t_peak / t_form
        row["variants"][name] = {
            "median_ms": common.median(times[name]) * 1000,
            "gflops": flop / common.median(times[name]) / 1e9,
            "efficiency": eff["ratio_of_medians"] * scale,
            "efficiency_range": [eff["per_round_min"] * scale, eff["per_round_max"] * scale],
        }
    return row


@common.isolated
def run(profile: str = "quick", command: str | None = None, threads: int | None = common.DEFAULT_THREADS,
        out_dir=None, **overrides) -> dict:
    import torch

    from pqa_plugins.selectors import CosineSelector

    bench = common.Bench(NAME, profile, PROFILES, overrides, threads, command)
    params, threads_in_force = bench.params, bench.threads
    B, d, k, chunk = params["batch"], params["dim"], params["k"], params["chunk"]
    a = torch.randn(params["peak_n"], params["peak_n"])
    b = torch.randn(params["peak_n"], params["peak_n"])
    peak_flop = 2.0 * params["peak_n"] ** 3
    cosine = CosineSelector(temperature=0.05)
    renorm = CosineSelector(temperature=0.05)

    def cosine_renorm(q, z):
        renorm._cache = None  # normalise the doc vectors again, as without the cache
        return renorm(q, z).topk(k, dim=-1)
    scale_rows = []
    for n in params["sizes"]:
        z = clustered_unit_vectors(n, d, seed=n)
        q = queries_near(z, B, seed=n + 1)
        flop = 2.0 * B * n * d
        times = common.interleaved({
            "peak_mm": lambda: torch.mm(a, b),
            "matmul": lambda: q @ z.T,
            "exact_topk": lambda: exact_topk(q, z, k),
            "chunked_topk": lambda: chunked_topk(q, z, k, chunk),
            "cosine_topk": lambda: cosine(q, z).topk(k, dim=-1),
            "cosine_renorm_topk": lambda: cosine_renorm(q, z),
        }, rounds=params["rounds"], warmup=params["warmup"])
        assert torch.equal(exact_topk(q, z, k)[1].sort(-1).values, chunked_topk(q, z, k, chunk)[1].sort(-1).values)
        scale_rows.append(scale_row(n, flop, peak_flop, times))
        del z, q
    faiss = _faiss()
    ann_rows, faiss_note = [], None
    if faiss is None:
        faiss_note = "faiss not installed (pip install faiss-cpu): ANN rows skipped"
        print(f"[{NAME}] {faiss_note}", file=sys.stderr)
    else:
        for kind, n in params["ann"]:
            z, queries = ann_dataset(kind, n, d, params["recall_queries"])
            ann_rows += faiss_rows(faiss, z, queries, params, kind, threads_in_force)
            del z, queries
    headline = [r for r in scale_rows if r["N"] == max(params["sizes"])][0]["variants"]["exact_topk"]["efficiency"]
    best = {}
    for r in ann_rows:
        if r["dataset"] == "clustered" and r["recall_at_10"] >= GOAL_RECALL:
            if r["N"] not in best or r["nprobe"] < best[r["N"]]["nprobe"]:
                best[r["N"]] = r
    ann_n = max(n for kind, n in params["ann"] if kind == "clustered")
    ann_at_max = best.get(ann_n)
    result = {
        **bench.head(), "scale": scale_rows, "ann": ann_rows, "faiss_note": faiss_note,
        "goals": {
            "efficiency": {"metric": f"exact_topk FLOP/s / torch.mm peak at N={max(params['sizes'])}",
                           "target": f">= {GOAL_EFFICIENCY}", "value": headline, "met": headline >= GOAL_EFFICIENCY},
            "recall": {"metric": f"recall@10 of faiss IVF at N={ann_n} (clustered), smallest "
                                 f"nprobe reaching the target", "target": f">= {GOAL_RECALL}",
                       "value": None if ann_at_max is None else ann_at_max["recall_at_10"],
                       "nprobe": None if ann_at_max is None else ann_at_max["nprobe"],
                       "speedup": None if ann_at_max is None else ann_at_max["speedup"],
                       "met": None if faiss is None else ann_at_max is not None},
        },
    }
    if out_dir is not None:
        result["plot"] = plot(result, Path(out_dir))
    return bench.finish(result)


def refresh(result: dict) -> dict:
    """Recompute the scale rows and the efficiency goal from the stored per-round seconds."""
    rows = [scale_row(r["N"], r["flop"], r.get("peak_flop", 2.0 * result["params"]["peak_n"] ** 3), r["seconds"])
            for r in result["scale"]]
    result["scale"] = rows
    top = [r for r in rows if r["N"] == max(result["params"]["sizes"])][0]["variants"]["exact_topk"]["efficiency"]
    result["goals"]["efficiency"].update(value=top, met=top >= GOAL_EFFICIENCY)
    return result


def plot(result: dict, out_dir: Path):
    """``selection_scale.png``: GFLOP/s vs N against the peak, and recall vs speedup. None without matplotlib."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[{NAME}] matplotlib not installed: no plot", file=sys.stderr)
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    panels = 2 if result["ann"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    ns = [r["N"] for r in result["scale"]]
    peak = [r["peak_gflops"] for r in result["scale"]]
    ax.plot(ns, peak, "k-", label="torch.mm peak (same rounds)")
    ax.plot(ns, [GOAL_EFFICIENCY * p for p in peak], "k:", label=f"{GOAL_EFFICIENCY:.0%} of peak (goal)")
    for name, style in (("matmul", "o-"), ("exact_topk", "s-"), ("chunked_topk", "^-"), ("cosine_topk", "x--"),
                        ("cosine_renorm_topk", "+:")):
        if name not in result["scale"][0]["variants"]:
            continue
        ax.plot(ns, [r["variants"][name]["gflops"] for r in result["scale"]], style, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("N doc vectors")
    ax.set_ylabel("GFLOP/s (2*B*N*d useful FLOP)")
    ax.set_title(f"Selection, B={result['params']['batch']}, d={result['params']['dim']}, "
                 f"{result['machine']['torch_threads']} thread(s)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if result["ann"]:
        ax = axes[0][1]
        groups = {}
        for r in result["ann"]:
            groups.setdefault((r["dataset"], r["N"]), []).append(r)
        for (dataset, n), rows in groups.items():
            ax.plot([r["recall_at_10"] for r in rows], [r["speedup"] for r in rows], "o-", label=f"{dataset}, N={n:,}")
            for r in rows:
                ax.annotate(f"{r['nprobe']}", (r["recall_at_10"], r["speedup"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.axvline(GOAL_RECALL, color="k", linestyle=":", label=f"recall goal {GOAL_RECALL}")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("recall@10 vs exact")
        ax.set_ylabel("speedup over exact top-k (x)")
        ax.set_title("faiss IVF-Flat (labels: nprobe)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / f"{NAME}.png"
    tmp = out_dir / f".{NAME}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return str(path)


def markdown(result: dict) -> str:
    p, goals = result["params"], result["goals"]
    rows = []
    for r in result["scale"]:
        for name in (f for f in FORMS if f in r["variants"]):
            v = r["variants"][name]
            rows.append([f"{r['N']:,}", name, f"{v['median_ms']:.2f}", f"{v['gflops']:.1f}", f"{r['peak_gflops']:.1f}",
                         f"{v['efficiency']:.0%}", common.span(*v["efficiency_range"], ".0%")])
    scale_table = common.md_table(["N", "form", "median ms", "GFLOP/s", "peak GFLOP/s", "of peak", "per-round range"],
                                  rows)
    eff = goals["efficiency"]
    lines = [
        f"B={p['batch']} queries, d={p['dim']}, top-{p['k']}, fp32; peak = `torch.mm` of two {p['peak_n']}x{p['peak_n']} "
        f"matrices timed in the same interleaved rounds ({p['rounds']} rounds after {p['warmup']} warm-up); "
        f"chunked form uses blocks of {p['chunk']:,} rows. \"of peak\" = median GFLOP/s / median peak GFLOP/s; "
        f"the range is that of the per-round ratios (wide when the machine was busy).",
        "",
        scale_table,
        "",
        f"Goal: exact top-k selection at >= {GOAL_EFFICIENCY:.0%} of the matmul peak: at N={max(p['sizes']):,} "
        f"**{eff['value']:.0%}, {common.verdict(eff['met'])}**.",
    ]
    if result.get("plot"):
        lines += ["", f"![selection at scale]({Path(result['plot']).name})"]
    lines += ["", "### Approximate search (faiss IVF-Flat)", ""]
    if result["faiss_note"]:
        lines.append(f"Skipped: {result['faiss_note']}.")
    else:
        ann = [[r["dataset"], f"{r['N']:,}", r["nlist"], r["nprobe"], f"{r['recall_at_10']:.3f}",
                f"{r['exact_ms']:.2f}", f"{r['faiss_ms']:.2f}", f"{r['speedup']:.1f}x",
                common.span(*r["speedup_range"], ".1f"), f"{r['build_s']:.1f}"]
               for r in result["ann"]]
        lines.append(common.md_table(["vectors", "N", "nlist", "nprobe", "recall@10", "exact ms", "faiss ms",
                                      "speedup", "per-round range", "build s"], ann))
        rec = goals["recall"]
        verdict = (f"**{rec['value']:.3f} at nprobe={rec['nprobe']} ({rec['speedup']:.1f}x faster than exact), met**"
                   if rec["met"] else "**NOT met at any nprobe tried**")
        ann_n = max(n for kind, n in p["ann"] if kind == "clustered")
        lines += ["", f"Goal: recall@10 >= {GOAL_RECALL} (clustered queries, N={ann_n:,}): {verdict}. "
                  f"{p['recall_queries']} recall queries; speed timed on the first {p['batch']}."]
    return common.section("(d) Selection at scale", result, "\n".join(lines))


def main(argv=None) -> int:
    return common.script_main(sys.modules[__name__], argv, run_kwargs=lambda args, out: {"out_dir": out})


if __name__ == "__main__":
    sys.exit(main())
