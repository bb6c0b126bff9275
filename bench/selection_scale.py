"""(d) Selection at scale: exact top-k over N doc vectors against this machine's matmul peak, and
faiss indexes (IVF, HNSW) for large N: recall@10 against exact search, and their speedup.

For each N, in interleaved rounds: a square fp32 ``torch.mm`` (the peak), and the selection of
B=64 queries, d=384: ``scores = q @ Z.T`` then top-10, in these forms:

- ``matmul``: the ``[B, N]`` scores alone (no top-k);
- ``exact_topk``: full ``[B, N]`` scores then ``torch.topk`` (what evaluation did before the index);
- ``chunked_topk``: pqa's exact search (``eval.index=exact``, ``pqa_core.modeling.selection_index.matmul_topk``):
  blocks of Z rows scored into one reused buffer, and only the rows whose block maximum beats their
  running 10th best merge the block's top-10 (same result; the ``[B, N]`` matrix never exists);
- ``cosine_topk``: the ``cosine`` selector through pqa's exact index (normalised doc vectors kept
  while they are unchanged);
- ``cosine_renorm_topk``: the ``cosine`` selector scoring all of Z with its cache emptied before
  every call (what training does, where gradients flow to the doc vectors).

Useful work is ``2*B*N*d`` FLOP in every form; efficiency = achieved FLOP/s / peak FLOP/s of the
same round. Goal: >= 60% for pqa's exact search at the largest N. At that N the block size is also
swept (``chunk`` rows per block), which is how ``DEFAULT_CHUNK`` was chosen.

Indexes (``pip install faiss-cpu``; skipped with a message when missing), through pqa's own index
classes (``eval.index=faiss_ivf`` / ``faiss_hnsw``) with the ``dot`` selector on unit vectors:
IVF-Flat with ``ivf_lists(N)`` lists (4*sqrt(N) as a power of two), nprobe swept; HNSW-Flat (M=32,
efConstruction=80), efSearch swept. Recall@10 = |index top-10 ∩ exact top-10| / 10 over the recall
queries; speedup = pqa's exact search time / the index's search time for the same B=64 queries,
interleaved. Building uses the benchmark's threads and is reported, not part of the ratio.

Vector sets:

- ``squad-minilm``: real all-MiniLM-L6-v2 embeddings (as ``model.doc_init=minilm`` computes them)
  of the 1,733 passages of ``../shared/data/squad_v1.1``, tiled to N: copy 0 is the passages
  themselves, every further copy each passage plus Gaussian noise, normalised, at cosine 0.8 to
  its passage (a paraphrase-like perturbation). Queries: the real MiniLM embeddings of that
  folder's questions. Tiling makes ~N/1733 near-copies of each passage, so a question's
  neighbours are copies of a few passages: an easier set than N distinct passages would be.
- ``clustered`` (synthetic, shaped after the same embeddings: measured on 300 passages and 300
  questions, passages of one article have mean cosine 0.40, a question has cosine 0.57 with its
  passage, an article has ~43 passages): unit vectors around N/40 random "article" centres with
  spread 1.22 (cosine 1/(1+1.22^2) = 0.40 inside a group); queries are new members of the groups.
- ``question-like``: the clustered documents, queries a random document plus noise 1.44 (cosine
  0.57 with it). With isotropic noise in 384 dimensions the rest of the exact top-10 is chance.
- ``uniform``: uniform random unit vectors and queries; nothing to prune, the worst case.

The recall goal is read on ``clustered`` at the largest N (the hardest set with structure).
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
from pqa_core.storage.atomic import atomic_file  # noqa: E402

NAME = "selection_scale"
GOAL_EFFICIENCY = 0.60
GOAL_RECALL = 0.95
PROFILES = {
    "smoke": dict(sizes=[2_000], batch=8, dim=32, k=10, rounds=2, warmup=1, peak_n=256, chunks=[256, 512],
                  ann=[("clustered", 2_000)], nprobes=[2, 8], ef_searches=[16, 64], hnsw_m=16, ef_construction=40,
                  recall_queries=16),
    "quick": dict(sizes=[10_000, 100_000], batch=64, dim=384, k=10, rounds=7, warmup=1, peak_n=1024,
                  chunks=[1024, 2048, 4096, 16_384], ann=[("clustered", 100_000), ("squad-minilm", 100_000)],
                  nprobes=[2, 8, 32], ef_searches=[16, 32, 64, 128], hnsw_m=32, ef_construction=40,
                  recall_queries=256),
    "full": dict(sizes=[10_000, 100_000, 1_000_000], batch=64, dim=384, k=10, rounds=7, warmup=1, peak_n=1536,
                 chunks=[512, 1024, 2048, 4096, 8192, 16_384, 65_536],
                 ann=[("clustered", 100_000), ("clustered", 1_000_000), ("squad-minilm", 100_000),
                      ("squad-minilm", 1_000_000), ("question-like", 100_000), ("uniform", 100_000)],
                 nprobes=[4, 16, 64, 256], ef_searches=[16, 32, 64, 128, 256], hnsw_m=32, ef_construction=40,
                 recall_queries=512),
}
DOCS_PER_CENTRE = 40  # ~43 passages per SQuAD article
SPREAD = 1.22  # same-centre cosine 1/(1+s^2) = 0.40, as MiniLM gives passages of one SQuAD article
QUERY_NOISE = 1.44  # question-passage cosine 1/sqrt(1+t^2) = 0.57, as MiniLM gives a SQuAD question and its passage
TILE_COSINE = 0.8  # a tiled copy of a SQuAD passage embedding keeps this cosine with the passage
SQUAD_DIR = common.SQUAD_DIR


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


def squad_minilm(question_count: int, squad_dir: Path = SQUAD_DIR):
    """MiniLM embeddings of the SQuAD passages (title + text, as ``model.doc_init=minilm``) and of
    ``question_count`` of its questions (a seeded sample). The embeddings of all passages and questions
    are cached in ``~/.cache/pqa/bench`` under the data files' sha256 (computing them takes minutes on
    one core)."""
    import torch
    from safetensors.torch import load_file, save_file

    from pqa_core.storage.atomic import sha256_file
    from pqa_core.data.loading import load_corpus, load_qa
    from pqa_core.modeling.minilm import embed_texts

    if not (squad_dir / "corpus.jsonl").exists():
        raise FileNotFoundError(f"SQuAD v1.1 data not found in {squad_dir} (corpus.jsonl, qa.jsonl)")
    digest = sha256_file(squad_dir / "corpus.jsonl")[:16] + sha256_file(squad_dir / "qa.jsonl")[:16]
    cache = Path(os.environ.get("PQA_CACHE_DIR", Path.home() / ".cache" / "pqa")) / "bench" / \
        f"squad_minilm_{digest}.safetensors"
    if cache.exists():
        saved = load_file(str(cache))
    else:
        corpus = load_corpus(squad_dir / "corpus.jsonl")
        questions = load_qa(squad_dir / "qa.jsonl", corpus)
        saved = {"passages": embed_texts([(d.title.replace("_", " ") + ". " + d.text).strip(". ") for d in corpus]),
                 "questions": embed_texts([q.question for q in questions])}
        with atomic_file(cache) as tmp:
            save_file({k: v.contiguous() for k, v in saved.items()}, str(tmp))
    questions = saved["questions"]
    pick = torch.randperm(questions.shape[0], generator=torch.Generator().manual_seed(0))[:question_count]
    return saved["passages"], questions[pick.sort().values].contiguous()


def tiled(base, n: int, seed: int, cosine: float = TILE_COSINE):
    """``n`` unit vectors: ``base`` itself, then copies of it with Gaussian noise at ``cosine`` to their row."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sigma = math.sqrt(1.0 / cosine ** 2 - 1.0)  # |noise| = sigma for a unit row: cosine 1/sqrt(1+sigma^2)
    out = torch.empty(n, base.shape[1])
    take = min(n, base.shape[0])
    out[:take] = base[:take]
    for start in range(take, n, base.shape[0]):
        stop = min(start + base.shape[0], n)
        noise = torch.nn.functional.normalize(torch.randn(stop - start, base.shape[1], generator=g), dim=-1)
        out[start:stop] = torch.nn.functional.normalize(base[:stop - start] + sigma * noise, dim=-1)
    return out


def ann_dataset(kind: str, n: int, dim: int, count: int):
    """(documents [n, dim], queries [count, dim]) for one vector set."""
    if kind == "clustered":
        both = clustered_unit_vectors(n + count, dim, seed=n)  # queries: held-out members of the same groups
        return both[:n].contiguous(), both[n:].contiguous()
    if kind == "question-like":
        z = clustered_unit_vectors(n, dim, seed=n)
        return z, queries_near(z, count, seed=n + 2)
    if kind == "uniform":
        return uniform_unit_vectors(n, dim, seed=n), uniform_unit_vectors(count, dim, seed=n + 2)
    if kind == "squad-minilm":
        passages, questions = squad_minilm(count)
        return tiled(passages, n, seed=n), questions
    raise ValueError(f"unknown vector set {kind!r}")


# ---------------------------------------------------------------- selection forms

def exact_topk(q, z, k: int):
    return (q @ z.T).topk(k, dim=-1)


def _faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return None
    return faiss


def recall_at_k(approx, exact) -> float:
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact))
    return hits / float(exact.shape[0] * exact.shape[1])


def index_rows(z, queries, params, dataset: str):
    """Rows for pqa's faiss indexes on one vector set: IVF per nprobe, HNSW per efSearch. Recall over all
    the queries; speed interleaved against pqa's exact search on the first B."""
    import torch

    from pqa_core.config import PQAConfig
    from pqa_core.components.plugins import build
    from pqa_core.modeling.selection_index import ExactIndex, build_index, ivf_lists

    k, B = params["k"], params["batch"]
    dot = build("selector", "dot", {})
    exact_index = ExactIndex()
    exact = exact_index.search(dot, z, queries, k)[1]
    batch = queries[:B].contiguous()
    settings = PQAConfig.from_dict({"eval": {"faiss": {"hnsw_m": params["hnsw_m"],
                                                       "ef_construction": params["ef_construction"]}}}).eval
    rows = []
    for name, knob, values in (("faiss_ivf", "nprobe", params["nprobes"]),
                               ("faiss_hnsw", "efSearch", params["ef_searches"])):
        settings.index = name
        index = build_index(settings)
        index.search(dot, z, batch[:1], k)  # builds it
        nlist = ivf_lists(z.shape[0]) if name == "faiss_ivf" else None
        for value in values:
            if nlist is not None and value > nlist:
                continue
            if name == "faiss_ivf":
                index.index.nprobe = value
            else:
                index.index.hnsw.efSearch = value
            recall = recall_at_k(index.search(dot, z, queries, k)[1], exact)
            times = common.interleaved({"exact": lambda: exact_index.search(dot, z, batch, k),
                                        "index": lambda: index.search(dot, z, batch, k)},
                                       rounds=params["rounds"], warmup=params["warmup"])
            speed = common.ratio_stats(times["exact"], times["index"])
            rows.append({"dataset": dataset, "N": int(z.shape[0]), "index": name, "knob": knob, "value": value,
                         "nlist": nlist, "recall_at_10": recall, "exact_ms": common.median(times["exact"]) * 1000,
                         "index_ms": common.median(times["index"]) * 1000, "speedup": speed["ratio_of_medians"],
                         "speedup_range": [speed["per_round_min"], speed["per_round_max"]],
                         "build_s": index.build_seconds, "seconds": times})
        del index
    del exact_index
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


# ---------------------------------------------------------------- run

FORMS = ("matmul", "exact_topk", "chunked_topk", "cosine_topk", "cosine_renorm_topk")
HEADLINE = "chunked_topk"  # pqa's exact search: what the efficiency goal is read on


def scale_row(n: int, flop: float, peak_flop: float, times: dict) -> dict:
    """Summary of one N from the raw per-round seconds: efficiency = median FLOP/s / median peak FLOP/s
    (the ratio of the two medians, as the table's columns), with the per-round ratios' range as noise."""
    peak = peak_flop / common.median(times["peak_mm"])
    row = {"N": n, "flop": flop, "peak_flop": peak_flop, "peak_gflops": peak / 1e9, "variants": {}, "seconds": times}
    scale = flop / peak_flop
    for name in (f for f in times if f != "peak_mm"):
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

    from pqa_core.components.plugins import build
    from pqa_core.modeling.selection_index import DEFAULT_CHUNK, ExactIndex, matmul_topk

    bench = common.Bench(NAME, profile, PROFILES, overrides, threads, command)
    params = bench.params
    B, d, k = params["batch"], params["dim"], params["k"]
    a = torch.randn(params["peak_n"], params["peak_n"])
    b = torch.randn(params["peak_n"], params["peak_n"])
    peak_flop = 2.0 * params["peak_n"] ** 3
    cosine = build("selector", "cosine", {"temperature": 0.05})
    cosine_index = ExactIndex()
    renorm = build("selector", "cosine", {"temperature": 0.05})

    def cosine_renorm(q, z):
        renorm._cache = None  # normalise the doc vectors again, as without the cache
        return renorm(q, z).topk(k, dim=-1)
    scale_rows, chunk_row = [], None
    for n in params["sizes"]:
        z = clustered_unit_vectors(n, d, seed=n)
        q = queries_near(z, B, seed=n + 1)
        flop = 2.0 * B * n * d
        forms = {
            "peak_mm": lambda: torch.mm(a, b),
            "matmul": lambda: q @ z.T,
            "exact_topk": lambda: exact_topk(q, z, k),
            "chunked_topk": lambda: matmul_topk(q, z, k),
            "cosine_topk": lambda: cosine_index.search(cosine, z, q, k),
            "cosine_renorm_topk": lambda: cosine_renorm(q, z),
        }
        times = common.interleaved(forms, rounds=params["rounds"], warmup=params["warmup"])
        assert torch.equal(exact_topk(q, z, k)[1], matmul_topk(q, z, k)[1])
        scale_rows.append(scale_row(n, flop, peak_flop, times))
        if n == max(params["sizes"]):  # block sizes, at the largest N
            sweep = {"peak_mm": forms["peak_mm"]}
            sweep.update({f"chunk={c}": (lambda c=c: matmul_topk(q, z, k, chunk=c)) for c in params["chunks"]})
            chunk_row = scale_row(n, flop, peak_flop, common.interleaved(sweep, rounds=params["rounds"],
                                                                         warmup=params["warmup"]))
            chunk_row["default_chunk"] = DEFAULT_CHUNK
        cosine_index = ExactIndex()  # let the normalised copy go with z
        del z, q
    faiss = _faiss()
    ann_rows, faiss_note, skipped = [], None, []
    if faiss is None:
        faiss_note = "faiss not installed (pip install faiss-cpu): index rows skipped"
        print(f"[{NAME}] {faiss_note}", file=sys.stderr)
    else:
        for kind, n in params["ann"]:
            try:
                z, queries = ann_dataset(kind, n, d, params["recall_queries"])
            except FileNotFoundError as exc:
                skipped.append(f"{kind} N={n:,}: {exc}")
                print(f"[{NAME}] skipped {kind}: {exc}", file=sys.stderr)
                continue
            ann_rows += index_rows(z, queries, params, kind)
            del z, queries
    headline = [r for r in scale_rows if r["N"] == max(params["sizes"])][0]["variants"][HEADLINE]["efficiency"]
    result = {
        **bench.head(), "scale": scale_rows, "chunks": chunk_row, "ann": ann_rows, "faiss_note": faiss_note,
        "skipped": skipped,
        "goals": {
            "efficiency": {"metric": f"pqa exact top-k (chunked_topk) FLOP/s / torch.mm peak at "
                                     f"N={max(params['sizes'])}",
                           "target": f">= {GOAL_EFFICIENCY}", "value": headline, "met": headline >= GOAL_EFFICIENCY},
            "recall": recall_goal(ann_rows, params, faiss is not None),
            "recall_real": recall_goal(ann_rows, params, faiss is not None, "squad-minilm"),
        },
    }
    if out_dir is not None:
        result["plot"] = plot(result, Path(out_dir))
    return bench.finish(result)


def recall_goal(ann_rows, params, have_faiss: bool, dataset: str = "clustered") -> dict:
    """The fastest index setting reaching the recall target on ``dataset`` at its largest N."""
    sizes = [n for kind, n in params["ann"] if kind == dataset]
    ann_n = max(sizes) if sizes else None
    hits = [r for r in ann_rows if r["dataset"] == dataset and r["N"] == ann_n and r["recall_at_10"] >= GOAL_RECALL]
    best = max(hits, key=lambda r: r["speedup"]) if hits else None
    return {"metric": f"recall@10 of a faiss index at N={ann_n} ({dataset}), the fastest setting reaching the target",
            "target": f">= {GOAL_RECALL}", "value": None if best is None else best["recall_at_10"],
            "index": None if best is None else f"{best['index']} {best['knob']}={best['value']}",
            "speedup": None if best is None else best["speedup"],
            "met": None if not have_faiss else best is not None}


def refresh(result: dict) -> dict:
    """Recompute the scale rows and the efficiency goal from the stored per-round seconds."""
    rows = [scale_row(r["N"], r["flop"], r.get("peak_flop", 2.0 * result["params"]["peak_n"] ** 3), r["seconds"])
            for r in result["scale"]]
    result["scale"] = rows
    top = [r for r in rows if r["N"] == max(result["params"]["sizes"])][0]["variants"][HEADLINE]["efficiency"]
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
            groups.setdefault((r["dataset"], r["N"], r["index"]), []).append(r)
        for (dataset, n, index), rows in groups.items():
            style = "o-" if index == "faiss_hnsw" else "s--"
            ax.plot([r["recall_at_10"] for r in rows], [r["speedup"] for r in rows], style,
                    label=f"{index[6:]}, {dataset}, N={n:,}")
        ax.axvline(GOAL_RECALL, color="k", linestyle=":", label=f"recall goal {GOAL_RECALL}")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("recall@10 vs exact")
        ax.set_ylabel("speedup over pqa's exact search (x)")
        ax.set_title("faiss indexes (IVF: nprobe, HNSW: efSearch swept)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = out_dir / f"{NAME}.png"
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
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
        f"matrices timed in the same interleaved rounds ({p['rounds']} rounds after {p['warmup']} warm-up). "
        f"`chunked_topk` is pqa's exact search (`eval.index=exact`). \"of peak\" = median GFLOP/s / median peak "
        f"GFLOP/s; the range is that of the per-round ratios (wide when the machine was busy).",
        "",
        scale_table,
        "",
        f"Goal: pqa's exact top-k at >= {GOAL_EFFICIENCY:.0%} of the matmul peak: at N={max(p['sizes']):,} "
        f"**{eff['value']:.0%}, {common.verdict(eff['met'])}**.",
    ]
    chunks = result.get("chunks")
    if chunks:
        crow = [[name.split("=")[1], f"{v['median_ms']:.1f}", f"{v['efficiency']:.0%}",
                 common.span(*v["efficiency_range"], ".0%")] for name, v in chunks["variants"].items()]
        lines += ["", f"Block size of pqa's exact search at N={chunks['N']:,} (same interleaved rounds; "
                  f"`DEFAULT_CHUNK` = {chunks['default_chunk']:,}):", "",
                  common.md_table(["rows per block", "median ms", "of peak", "per-round range"], crow)]
    if result.get("plot"):
        lines += ["", f"![selection at scale]({Path(result['plot']).name})"]
    lines += ["", "### Indexes (faiss, through `eval.index`)", ""]
    if result["faiss_note"]:
        lines.append(f"Skipped: {result['faiss_note']}.")
    else:
        ann = [[r["dataset"], f"{r['N']:,}", r["index"], f"{r['knob']}={r['value']}"
                + (f" of {r['nlist']}" if r.get("nlist") else ""), f"{r['recall_at_10']:.3f}",
                f"{r['exact_ms']:.1f}", f"{r['index_ms']:.2f}", f"{r['speedup']:.1f}x",
                common.span(*r["speedup_range"], ".1f"), f"{r['build_s']:.0f}"]
               for r in result["ann"]]
        lines.append(common.md_table(["vectors", "N", "index", "setting", "recall@10", "exact ms", "index ms",
                                      "speedup", "per-round range", "build s"], ann))
        verdicts = []
        for key in ("recall", "recall_real"):
            rec = goals.get(key)
            if not rec or "N=None" in rec["metric"]:
                continue
            where = rec["metric"].split("(")[1].split(")")[0]
            verdicts.append(f"{where} at N={int(rec['metric'].split('N=')[1].split()[0]):,}: "
                            + (f"**{rec['value']:.3f} with {rec['index']} ({rec['speedup']:.1f}x faster than exact), "
                               f"met**" if rec["met"] else "**NOT met by any setting tried**"))
        lines += ["", f"Goal: recall@10 >= {GOAL_RECALL}: {'; '.join(verdicts)}. "
                  f"{p['recall_queries']} recall queries; speed timed on the first {p['batch']}; HNSW M={p['hnsw_m']}, "
                  f"efConstruction={p['ef_construction']}; build with {result['machine']['torch_threads']} thread(s)."]
    for line in result.get("skipped") or []:
        lines += ["", f"Not measured: {line}"]
    return common.section("(d) Selection at scale", result, "\n".join(lines))


def main(argv=None) -> int:
    return common.script_main(sys.modules[__name__], argv, run_kwargs=lambda args, out: {"out_dir": out})


if __name__ == "__main__":
    sys.exit(main())
