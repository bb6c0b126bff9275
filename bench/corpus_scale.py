"""(h) Training-step cost against the size of the corpus: the same write step and the same read step with
a small and a large doc-vector table, side by side.

Both models are SmolLM2-135M with LoRA, the ``hybrid`` projection (z = a 384-float MiniLM key + 4 x 576
free floats) and the MiniLM query encoder, built on the shipped sample (36 documents); the table is
then widened to N rows (the extra rows: random unit keys, zero content; documents no batch ever holds,
as in a large corpus). Each round runs, in alternating order, on both tables:

- ``write_step``: ``WritePhaseTrainer.train_step`` (``reconstruct``) on the same 8 documents;
- ``read_step``: ``ReadPhaseTrainer.train_step`` with ``read.key_updates=batch`` on the same 8 questions;
- ``scoring``: what the read step cannot avoid doing for every document: the ``cosine`` selector over
  all N keys (normalising them, as training does), top-k, and the backward to the query side.

Goal: write step and read step at the large N / at the small N <= 1.1. The read step's ratio is also
given with the scoring's time taken out of both sides (its own cost grows with N by design).

A table of ``big`` rows (10^6 in the full profile), in a separate process so its peak memory is its
own: the same model with ``model.doc_dtype=bfloat16`` and ``model.doc_storage=mmap`` (the table and
the row-wise Adam moments in files under a temporary folder, mapped), widened to ``big`` rows; one
write step and one read step after one of each to warm up, then a checkpoint. Reported: the steps'
seconds, the peak resident memory (``VmHWM``) and what of the end's resident memory is file pages
(the mapped table, which the kernel may drop and read back) and what is anonymous; bytes per document
of the table, the moments and the checkpoint. Bytes per document of each projection come from the
model dimensions (z floats x 4 or 2 bytes; Adam: two moments of z and an 8-byte row step).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

NAME = "corpus_scale"
GOAL = 1.1
PROFILES = {
    "smoke": dict(llm="tiny", sizes=[100, 1_000], batch_size=4, rounds=2, warmup=1, big=5_000),
    "quick": dict(llm="smollm2-135m", sizes=[1_000, 10_000], batch_size=8, rounds=4, warmup=1, big=100_000),
    "full": dict(llm="smollm2-135m", sizes=[1_000, 100_000], batch_size=8, rounds=8, warmup=2, big=1_000_000),
}


def widen(model, num_docs: int, seed: int = 0) -> None:
    """Grow ``model.doc_vectors`` to ``num_docs`` rows, stored as the model's table storage says: the
    real rows first, then random unit keys with zero content (filled a block of rows at a time)."""
    import torch

    from pqa_core.modeling.doc_table import BLOCK_ROWS

    real = model.doc_vectors.detach()
    g = torch.Generator().manual_seed(seed)
    storage = model.table_storage
    table = storage.zeros("doc_vectors", (num_docs, real.shape[1]))
    table = table.to(storage.dtype) if not storage.mapped else table
    table[:real.shape[0]] = real.to(table.dtype)
    for start in range(real.shape[0], num_docs, BLOCK_ROWS):
        rows = min(BLOCK_ROWS, num_docs - start)
        table[start:start + rows, :model.key_dims] = torch.nn.functional.normalize(
            torch.randn(rows, model.key_dims, generator=g), dim=-1).to(table.dtype)
    del real
    model.doc_vectors = torch.nn.Parameter(table)


def setup(llm_name: str, num_docs: int, batch_size: int, doc_dtype: str = "float32", table_dir=None):
    """(model, write trainer, read trainer, write batch, read batch) with a table of ``num_docs`` rows
    (``table_dir``: a memory-mapped table's folder)."""
    import torch

    from pqa_core.modeling.builder import build_losses, build_model
    from pqa_core.config import PQAConfig
    from pqa_core.data.loading import ReadPhaseDataset, WritePhaseDataset, load_corpus, load_qa, sample_data_path
    from pqa_core.training.read_phase import ReadPhaseTrainer
    from pqa_core.training.write_phase import WritePhaseTrainer, prepared_objective

    config = PQAConfig.from_dict({
        # m=4 and zero content: the setting measured at 10^6 (at the default m=32 such a table is ~110 GB)
        "model": {"llm": llm_name, "d_z": 0, "device": "cpu", "doc_dtype": doc_dtype, "num_memory_tokens": 4,
                  "content_init": "zero", "doc_storage": "mmap" if table_dir else "memory"},
        "projection": {"name": "hybrid"},
        "read": {"batch_size": batch_size, "key_updates": "batch"}, "write": {"batch_size": batch_size}})
    corpus = load_corpus(sample_data_path("corpus.jsonl"))
    questions = load_qa(sample_data_path("qa_train.jsonl"), corpus)[:batch_size]
    model = build_model(config, corpus, device=torch.device("cpu"), table_dir=table_dir)
    widen(model, num_docs)
    data = config.data
    write_data = WritePhaseDataset(corpus, model.tokenizer, max_length=data.max_doc_tokens)
    objective = prepared_objective("reconstruct", model, write_data.rows)
    writer = WritePhaseTrainer(model, config.write, objective)
    retrieval_loss, generation_loss = build_losses(config)
    reader = ReadPhaseTrainer(model, config.read, retrieval_loss=retrieval_loss, generation_loss=generation_loss)
    read_data = ReadPhaseDataset(questions, model.tokenizer, encoder_tokenizer=model.query_encoder.tokenizer,
                                 max_query_length=data.max_query_tokens, max_answer_length=data.max_answer_tokens,
                                 prompt=data.prompt)
    write_batch = write_data.collate([write_data[i] for i in range(batch_size)])
    read_batch = read_data.collate([read_data[i] for i in range(len(read_data))])
    return model, writer, reader, write_batch, read_batch


def scoring(model, batch, k: int):
    """The selector over every key, top-k, backward to the query side: the read step's unavoidable O(N)."""
    import torch

    def run():
        query = model.query_encoder(batch["encoder_ids"], batch["encoder_mask"]).detach().requires_grad_(True)
        scores = model.selector(query, model.retrieval_keys().detach())
        scores.topk(k, dim=-1)
        torch.log_softmax(scores, dim=-1)[:, 0].sum().backward()
    return run


def large_table(llm_name: str, num_docs: int, batch_size: int, folder: str, threads: int = 1) -> dict:
    """One write and one read step (after one of each) on a bfloat16 memory-mapped table of ``num_docs``
    rows, then a checkpoint: times, memory, bytes per document. Run it in a process of its own."""
    import time
    from pathlib import Path

    import torch

    from pqa_core.storage.checkpoints import save_checkpoint

    torch.set_num_threads(threads)
    common.quiet_libraries()
    started = time.perf_counter()
    model, writer, reader, write_batch, read_batch = setup(llm_name, num_docs, batch_size, "bfloat16",
                                                          Path(folder) / "tables")
    built = time.perf_counter() - started
    seconds = {}
    for name, step in (("write_step", lambda: writer.train_step(write_batch)),
                       ("read_step", lambda: reader.train_step(read_batch))):
        step()
        t0 = time.perf_counter()
        step()
        seconds[name] = time.perf_counter() - t0
    after_steps = common.memory_gib()
    t0 = time.perf_counter()
    checkpoint = save_checkpoint(Path(folder) / "checkpoint", model, reader.optimizer, step=2, epoch=0)
    seconds["checkpoint"] = time.perf_counter() - t0
    files = {p.name: p.stat().st_size for p in checkpoint.iterdir() if p.is_file()}
    table = model.doc_vectors
    moments = [v for v in reader.optimizer.state[table].values() if torch.is_tensor(v) and v.dim() == 2]
    return {"num_docs": num_docs, "d_z": int(table.shape[1]), "dtype": str(table.dtype).replace("torch.", ""),
            "mapped": table.untyped_storage().filename is not None, "build_s": built, "seconds": seconds,
            "memory_after_steps": after_steps, "memory": common.memory_gib(), "bytes_per_doc": {
                "table": table.element_size() * table.shape[1],
                "adam_moments": sum(m.element_size() * m.shape[1] for m in moments),
                "row_step": 8, "checkpoint": sum(files.values()) / num_docs},
            "checkpoint_files": files}


def projection_bytes(d_model: int = 576, m: int = 4, key: int = 384) -> list:
    """Floats per document of each projection (SmolLM2: d_model 576, m=4) and bytes of z and Adam state."""
    rows = []
    for name, floats in (("mlp2x_gelu", key), ("linear", key), ("direct", m * d_model), ("hybrid", key + m * d_model)):
        for dtype, size in (("float32", 4), ("bfloat16", 2)):
            rows.append({"projection": name, "floats": floats, "dtype": dtype, "z": floats * size,
                         "adam": 2 * floats * size + 8, "total": 3 * floats * size + 8})
    return rows


def _large_table_in_subprocess(params: dict, threads: int) -> dict:
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pqa-bench-table-") as folder:
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from bench import corpus_scale; "
                "print(json.dumps(corpus_scale.large_table(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), "
                "sys.argv[5], int(sys.argv[6]))))")
        proc = subprocess.run([sys.executable, "-c", code, str(common.REPO_ROOT), params["llm"], str(params["big"]),
                               str(params["batch_size"]), folder, str(threads or 1)], capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
        return json.loads(proc.stdout.strip().splitlines()[-1])


@common.isolated
def run(profile: str = "quick", command: str | None = None, threads: int | None = common.DEFAULT_THREADS,
        **overrides) -> dict:
    bench = common.Bench(NAME, profile, PROFILES, overrides, threads, command)
    params = bench.params
    small, large = params["sizes"]
    big = _large_table_in_subprocess(params, bench.threads)  # first, while this process holds no model
    times, setup_info = side_by_side(params)
    ratios = {what: common.ratio_stats(times[f"{what}@{large}"], times[f"{what}@{small}"])
              for what in ("write_step", "read_step", "scoring")}
    net_large = [r - s for r, s in zip(times[f"read_step@{large}"], times[f"scoring@{large}"])]
    net_small = [r - s for r, s in zip(times[f"read_step@{small}"], times[f"scoring@{small}"])]
    ratios["read_step_without_scoring"] = common.ratio_stats(net_large, net_small)
    goals = {what: {"metric": f"{what.replace('_', ' ')} with {large:,} / {small:,} documents (median)",
                    "target": f"<= {GOAL}", "value": ratios[what]["ratio_of_medians"],
                    "met": ratios[what]["ratio_of_medians"] <= GOAL} for what in ("write_step", "read_step")}
    goals["big_table"] = {"metric": f"write and read step on a {params['big']:,}-document hybrid table "
                                    f"(bfloat16, mapped), peak resident memory", "target": "< 24 GiB",
                          "value": (big.get("memory_after_steps") or {}).get("peak_gib"),
                          "met": "error" not in big and big["memory_after_steps"]["peak_gib"] < 24}
    return bench.finish({"setup": setup_info, "seconds": times,
                         "median_s": {k: common.median(v) for k, v in times.items()}, "ratios": ratios,
                         "big_table": big, "projection_bytes": projection_bytes(), "goals": goals})


def side_by_side(params: dict):
    """The interleaved rounds on the small and the large table: ``(seconds per form, setup)``; the models
    are gone when it returns."""
    import resource

    import torch

    small, large = params["sizes"]
    sides, fns = {}, {}
    for n in (small, large):
        torch.manual_seed(0)
        model, writer, reader, write_batch, read_batch = setup(params["llm"], n, params["batch_size"])
        sides[n] = model
        fns[f"write_step@{n}"] = lambda w=writer, b=write_batch: w.train_step(b)
        fns[f"read_step@{n}"] = lambda r=reader, b=read_batch: r.train_step(b)
        fns[f"scoring@{n}"] = scoring(model, read_batch, reader.top_k)
    times = common.interleaved(fns, rounds=params["rounds"], warmup=params["warmup"])
    model = sides[large]
    return times, {"llm": params["llm"], "projection": "hybrid", "d_z": int(model.doc_vectors.shape[1]),
                   "key_dims": model.key_dims, "batch_size": params["batch_size"], "sizes": [small, large],
                   "table_mb": {n: m.doc_vectors.numel() * 4 / 2 ** 20 for n, m in sides.items()},
                   "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def markdown(result: dict) -> str:
    s, m, r = result["setup"], result["median_s"], result["ratios"]
    small, large = s["sizes"]
    rows = []
    for what, label in (("write_step", f"write step ({s['batch_size']} documents, `reconstruct`)"),
                        ("read_step", f"read step ({s['batch_size']} questions, `read.key_updates=batch`)"),
                        ("scoring", "scoring all keys (cosine, top-k, backward to the queries)")):
        rows.append([label, f"{m[f'{what}@{small}'] * 1000:.0f}", f"{m[f'{what}@{large}'] * 1000:.0f}",
                     f"{r[what]['ratio_of_medians']:.3f}", common.ratio_span(r[what])])
    net = r["read_step_without_scoring"]
    rows.append(["read step minus scoring", "", "", f"{net['ratio_of_medians']:.3f}", common.ratio_span(net)])
    table = common.md_table(["step", f"median ms, N={small:,}", f"median ms, N={large:,}", "ratio", "per-round range"],
                            rows)
    goals = result["goals"]
    verdicts = "; ".join(f"{goals[w]['metric']}: **{goals[w]['value']:.3f}, {common.verdict(goals[w]['met'])}**"
                         for w in ("write_step", "read_step"))
    big = result.get("big_table") or {}
    if "error" in big:
        big_lines = [f"The {result['params']['big']:,}-document table failed: {big['error']}"]
    elif big:
        steps, mem, b = big["memory_after_steps"], big["memory"], big["bytes_per_doc"]
        big_lines = [
            f"**{big['num_docs']:,}-document `hybrid` table** ({big['d_z']} floats per document, {big['dtype']}, "
            f"memory-mapped: {big['mapped']}): write step {big['seconds']['write_step']:.1f} s, read step "
            f"{big['seconds']['read_step']:.1f} s (`key_updates=batch`: every key scored a block at a time), "
            f"checkpoint {big['seconds']['checkpoint']:.0f} s; building it {big['build_s']:.0f} s. Peak resident "
            f"memory through the steps **{steps['peak_gib']:.1f} GiB** ({common.verdict(goals['big_table']['met'])}: "
            f"goal < 24 GiB), {steps['anon_gib']:.1f} GiB of it anonymous and {steps['file_gib']:.1f} GiB pages of "
            f"the mapped files (the kernel may drop them and read them back); with the checkpoint, which reads "
            f"every page of the table and its moments, the peak was {mem['peak_gib']:.1f} GiB, anonymous memory "
            f"{mem['anon_gib']:.1f} GiB at the end (no second copy). Bytes per document: table {b['table']:,}, Adam "
            f"moments {b['adam_moments']:,} + row step {b['row_step']}, checkpoint {b['checkpoint']:,.0f}."]
    else:
        big_lines = []
    per_projection = common.md_table(
        ["projection", "floats per document", "dtype", "z bytes", "Adam bytes (2 moments + step)", "total"],
        [[r["projection"], r["floats"], r["dtype"], f"{r['z']:,}", f"{r['adam']:,}", f"{r['total']:,}"]
         for r in result.get("projection_bytes", [])])
    return common.section(
        "(h) Step cost against corpus size", result,
        f"{s['llm']} with LoRA, `hybrid` projection (d_z = {s['d_z']}: a {s['key_dims']}-float key + free content), "
        f"MiniLM query encoder, `cosine` selector; tables of {small:,} and {large:,} rows "
        f"({s['table_mb'][small]:.0f} MB and {s['table_mb'][large]:.0f} MB of fp32 z; row-wise AdamW holds two more "
        f"of each); {result['params']['rounds']} interleaved rounds after {result['params']['warmup']} warm-up; "
        f"peak RSS of the process {s['peak_rss_gib']:.1f} GiB.",
        table, f"Goals (<= {GOAL}): {verdicts}.", *big_lines,
        "Bytes per document by projection (SmolLM2: d_model 576, m = 4 memory tokens; a 384-float MiniLM key):",
        per_projection)


def main(argv=None) -> int:
    return common.script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
