"""(k) Writing new documents: the encoder writer (one batched forward pass) vs the write phase (Adam steps per row).

Both sides write the same SQuAD passages (the new articles of (a)'s article split, else the sample) with the
same LLM, in one process, interleaved rounds:

- ``encoder L``: ``EncoderWriter.write_documents`` with the LLM's first L layers (L in ``layers``; L = all
  is the whole LLM as encoder, ICAE's setting), ``writer.batch_size`` documents per pass, no gradient,
  in float32; ``encoder L bf16`` the same under bfloat16 autocast (``writer.precision=bf16``). Where the
  shipped pqa artifact's writer has L layers, both load its trained weights, and the run reports how far
  the bfloat16 vectors are from the float32 ones (relative L2 distance, cosine per soft token);
- ``keywords``: the default start, the passage's salient words' embeddings (tf-idf over the batch);
- ``write phase``: one epoch of the write phase (``reconstruct``, batch 8, row-wise Adam): what writing a
  new document costs without an encoder, per epoch (bench (a)'s write phase runs 3-4).

Reported: documents per second of each, and the ratio encoder / write-phase epoch. Quality is not measured
here (an untrained encoder writes noise as fast as a trained one): bench (a) and ``pqa run pretrain``'s
scores measure what the written vectors are worth.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

NAME = "writer_speed"
GOAL_DOCS_PER_S = 20.0
PROFILES = {
    "smoke": dict(llm="tiny", documents=8, layers=[1, 2], batch_size=4, rounds=1, m=2, precisions=["fp32", "bf16"]),
    "quick": dict(llm="smollm2-135m", documents=32, layers=[2, 4, 30], batch_size=16, rounds=2, m=32,
                  precisions=["fp32", "bf16"]),
    "full": dict(llm="smollm2-135m", documents=64, layers=[2, 4, 8, 30], batch_size=16, rounds=3, m=32,
                 precisions=["fp32", "bf16"]),
}
DEFAULT_LAYERS = 4  # the encoder writer's default


def trained_writer_state(llm: str, layers: int, m: int):
    """The shipped pqa artifact's writer tensors when its writer has ``layers`` layers and ``m`` tokens, else None."""
    from safetensors.torch import load_file

    from pqa_core.storage.pretrained import MANIFEST, SHIPPED_DIR, read_manifest

    path = SHIPPED_DIR / llm / "pqa"
    if not (path / MANIFEST).exists():
        return None, None
    manifest = read_manifest(f"shipped:{llm}/pqa", path)
    shape = manifest.get("shape", {})
    if (shape.get("writer") or {}).get("layers") != layers or shape.get("num_memory_tokens") != m:
        return None, None
    tensors = load_file(str(path / "model.safetensors"))
    return {k[len("writer."):]: v for k, v in tensors.items() if k.startswith("writer.")}, str(path)


def agreement(reference, other) -> dict:
    """How far ``other``'s vectors are from ``reference``'s: relative L2 distance, mean and least cosine per token."""
    import torch.nn.functional as F

    cosine = F.cosine_similarity(other.flatten(0, 1), reference.flatten(0, 1), dim=-1)
    return {"relative_l2": float((other - reference).norm() / reference.norm()),
            "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}


def run(profile: str = "quick", command: str | None = None, threads: int | None = common.DEFAULT_THREADS,
        **overrides) -> dict:
    import torch

    from pqa_core.components import plugins
    from pqa_core.config import PQAConfig
    from pqa_core.data.loading import WritePhaseDataset, split_passages
    from pqa_core.modeling.builder import build_model, model_context
    from pqa_core.modeling.llm import load_llm
    from pqa_core.training.write_phase import WritePhaseTrainer, prepared_objective

    bench = common.Bench(NAME, profile, PROFILES, overrides, threads, command)
    p = bench.params
    torch.manual_seed(0)
    documents, source = common.squad_passages(p["documents"], "last")
    llm, tokenizer = load_llm(p["llm"])
    rows = split_passages(documents, tokenizer, 256)
    texts, tokens = [d.text for d in rows.documents], rows.tokens
    config = PQAConfig.from_dict({"model": {"llm": p["llm"], "num_memory_tokens": p["m"]},
                                  "write": {"epochs": 1, "batch_size": 8, "eval_every": 0, "eval_docs": 0}})
    model = build_model(config, rows.documents, (llm, tokenizer), row_tokens=tokens)
    context = model_context(config, model.llm, tokenizer)
    writers = {"keywords": plugins.build("writer", "keywords", {}, context)}
    trained = {}
    for layers in p["layers"]:
        state, trained[layers] = trained_writer_state(p["llm"], layers, p["m"])
        for precision in p["precisions"]:
            name = f"encoder {layers}" + ("" if precision == "fp32" else f" {precision}")
            writers[name] = plugins.build("writer", "encoder", {"layers": layers, "batch_size": p["batch_size"],
                                                                "precision": precision}, context)
            writers[name].prepare(texts, tokens)
            if state is not None:
                writers[name].load_state_dict(state)
    objective = prepared_objective("reconstruct", model, rows)
    trainer = WritePhaseTrainer(model, config.write, objective)
    dataset = WritePhaseDataset(rows, tokenizer)

    def write_epoch():
        for batch in torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=dataset.collate):
            trainer.train_step(batch)

    fns = {name: (lambda w=w: w.write_documents(texts, tokens)) for name, w in writers.items()}
    precise = {layers: writers[f"encoder {layers}"].write_documents(texts, tokens)
               for layers in p["layers"] if "fp32" in p["precisions"]}
    agree = {f"encoder {layers} {precision}": {**agreement(precise[layers], writers[f"encoder {layers} {precision}"]
                                                            .write_documents(texts, tokens)),
                                               "trained": trained[layers] is not None}
             for layers in precise for precision in p["precisions"] if precision != "fp32"}
    fns["write phase (1 epoch)"] = write_epoch
    times = common.interleaved(fns, rounds=p["rounds"], warmup=1)
    n = len(texts)
    rate = {name: n / common.median(t) for name, t in times.items()}
    epoch = times["write phase (1 epoch)"]
    ratios = {name: common.ratio_stats(epoch, t) for name, t in times.items() if name.startswith("encoder")}
    best = max((name for name in rate if name.startswith("encoder")), key=lambda name: rate[name])
    defaults = [name for name in rate if name.split()[:2] == ["encoder", str(DEFAULT_LAYERS)]]
    default = max(defaults, key=lambda name: rate[name]) if defaults else best
    return bench.finish({
        "setup": {"llm": p["llm"], "documents": n, "source": source, "m": p["m"], "batch_size": p["batch_size"],
                  "mean_tokens": sum(map(len, tokens)) / n, "trained": {k: v for k, v in trained.items() if v}},
        "seconds": times, "documents_per_second": rate, "encoder_vs_write_epoch": ratios, "bf16_agreement": agree,
        "goal": {"metric": f"documents per second, {default} " + ("(the default writer; the faster precision)"
                                                                 if defaults else "(the fastest encoder)"),
                 "target": f">= {GOAL_DOCS_PER_S}", "value": rate[default], "met": rate[default] >= GOAL_DOCS_PER_S},
    })


def markdown(result: dict) -> str:
    s, rate, ratios, goal = result["setup"], result["documents_per_second"], result["encoder_vs_write_epoch"], result["goal"]
    agree = result.get("bf16_agreement", {})
    rows = []
    for name, docs in rate.items():
        r = ratios.get(name)
        rows.append([name, docs, common.median(result["seconds"][name]),
                     f"{r['ratio_of_medians']:.1f}" if r else "-", common.ratio_span(r, ".1f") if r else "-"])
    table = common.md_table(["writer", "documents / s", "median s", "x faster than 1 write-phase epoch",
                             "per-round range"], rows)
    if agree:
        table += "\n\n" + common.md_table(
            ["vectors", "weights", "relative L2 to float32", "mean cosine per soft token", "least cosine"],
            [[name, "trained (shipped artifact)" if a["trained"] else "untrained", f"{a['relative_l2']:.4f}",
              f"{a['cosine_mean']:.5f}", f"{a['cosine_min']:.4f}"] for name, a in agree.items()])
    return common.section(
        "(k) Writing new documents: encoder vs write phase", result,
        f"{s['documents']} passages of {s['source']} ({s['mean_tokens']:.0f} tokens on average), {s['llm']}, "
        f"m={s['m']}, encoder batch {s['batch_size']}; {result['params']['rounds']} interleaved rounds after a warm-up. "
        f"`encoder L` reads with the LLM's first L layers (30 = all of SmolLM2-135M), in float32; `bf16`: under "
        f"bfloat16 autocast (`writer.precision=bf16`). Trained writer weights: "
        f"{', '.join(f'{k} layers from `{v}`' for k, v in s.get('trained', {}).items()) or 'none (untrained)'}.",
        table,
        f"Goal: {goal['metric']} {goal['target']}: **{goal['value']:.1f}, {common.verdict(goal['met'])}**. "
        f"The write phase's cost is per epoch; bench (a)'s runs take 3-4 epochs, so the encoder's advantage at equal "
        f"quality is this ratio times the epochs the write phase needs to match it (quality: bench (a)).",
    )


def main(argv=None) -> int:
    return common.script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
