"""(f) Write-phase capacity: how many tokens of a document m memory tokens let the LLM rebuild greedily.

For each setting (projection, m) the write phase (pqa's ``WritePhaseTrainer``: AdamW over the
doc vectors and the projection, the LLM frozen) trains on the same D passages of SQuAD, each cut
to its first L tokens + eos, full batch, for a fixed number of steps. Every few steps each passage
is decoded greedily from its soft prompt alone (free-running: a first mistake usually derails the
rest). Reported per setting:

- capacity: the largest prefix length l such that greedy token accuracy over the first l tokens
  of every passage (pooled) is >= 90%; the figure the Cramming paper reports (80 tokens per
  vector for Pythia-160M after thousands of steps per text);
- tokens per memory vector (capacity / m), the correct prefix before the first mistake (median),
  passages rebuilt exactly, greedy and teacher-forced token accuracy over all L tokens;
- wall seconds per step.

Settings: ``direct`` (z is the soft prompt itself, m x d_model free floats per document: the
Cramming setting, the most a soft prompt can hold) for several m, against pqa's default
(``mlp2x_gelu`` from a 384-float z initialised from MiniLM) and ``hybrid`` (a MiniLM key through
the shared map plus m x d_model free floats) at the default m. A fixed step budget
is a CPU-sized budget: capacities here are what that budget reaches, a floor, not the ceiling.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

NAME = "write_capacity"
TARGET = 0.9
SQUAD_CORPUS = common.REPO_ROOT.parent / "shared" / "data" / "squad_v1.1" / "corpus.jsonl"
# settings: (projection, m, lr_z, betas of z's row-wise Adam); lr_projection is pqa's write default
PROFILES = {
    "smoke": dict(llm="tiny", docs=2, doc_tokens=12, steps=4, eval_every=2, target_acc=0.5,
                  settings=[("direct", 1, 1e-2, (0.9, 0.9)), ("direct", 4, 1e-2, (0.9, 0.9)),
                            ("hybrid", 4, 1e-2, (0.9, 0.9))]),
    "quick": dict(llm="smollm2-135m", docs=2, doc_tokens=32, steps=30, eval_every=15, target_acc=0.5,
                  settings=[("direct", 4, 1e-2, (0.9, 0.9)), ("direct", 4, 1e-2, (0.9, 0.999))]),
    # Cramming's optimiser (lr 1e-2, betas 0.9/0.9) against the Adam default betas and a larger lr, at two m
    "full": dict(llm="smollm2-135m", docs=2, doc_tokens=128, steps=100, eval_every=20, target_acc=0.5,
                 settings=[("direct", 8, 1e-2, (0.9, 0.9)), ("direct", 8, 3e-2, (0.9, 0.9)),
                           ("direct", 8, 1e-2, (0.9, 0.999)), ("direct", 4, 1e-2, (0.9, 0.9)),
                           ("hybrid", 8, 1e-2, (0.9, 0.9))]),
}


def prefix_capacity(hits, valid, target: float = TARGET) -> int:
    """Largest l with pooled greedy accuracy over every passage's first l positions >= target (0 if none)."""
    import torch

    correct = torch.cumsum((hits & valid).sum(0), 0).float()
    counted = torch.cumsum(valid.sum(0), 0).float().clamp(min=1)
    ok = (correct / counted >= target).nonzero()
    return int(ok.max()) + 1 if len(ok) else 0


def first_mistakes(hits, valid):
    """Per passage: the number of leading positions decoded right."""
    wrong = ~hits & valid
    length = valid.sum(1)
    first = wrong.float().argmax(1)
    return [int(length[i]) if not bool(wrong[i].any()) else int(first[i]) for i in range(hits.shape[0])]


def load_passages(tokenizer, docs: int, doc_tokens: int):
    """The first ``docs`` passages with at least ``doc_tokens`` tokens: SQuAD when present, else the sample."""
    from pqa_core.data.loading import load_corpus, sample_data_path

    source = SQUAD_CORPUS if SQUAD_CORPUS.exists() else Path(sample_data_path("corpus.jsonl"))
    chosen = [d for d in load_corpus(str(source))
              if len(tokenizer(d.text, add_special_tokens=False)["input_ids"]) >= doc_tokens][:docs]
    if len(chosen) < docs:
        raise SystemExit(f"{source}: only {len(chosen)} passages have >= {doc_tokens} tokens, {docs} needed")
    return chosen, source


def run_setting(llm_and_tokenizer, passages, params, setting, seed: int = 0):
    import torch

    from pqa_core.modeling.builder import build_model
    from pqa_core.config import PQAConfig, WriteSettings
    from pqa_core.data.loading import DocumentRows, WritePhaseDataset
    from pqa_core.training.write_phase import WritePhaseTrainer, prepared_objective

    projection, m, lr_z, betas = setting
    llm, tokenizer = llm_and_tokenizer
    # free vectors from zero (Cramming's protocol), the hybrid key in the prompt: capacity, not the default reader input
    model_cfg = {"llm": params["llm"], "num_memory_tokens": m, "lora": {"enabled": False}, "device": "cpu",
                 "content_init": "zero"}
    if projection in ("direct", "hybrid"):  # d_z=0: the size the projection needs (m x d_model free floats)
        model_cfg.update(d_z=0, doc_init="random" if projection == "direct" else "minilm")
    component = {"name": projection, **({"key_in_prompt": True} if projection == "hybrid" else {})}
    config = PQAConfig.from_dict({"seed": seed, "model": model_cfg, "projection": component})
    lr_projection = WriteSettings().lr_projection
    model = build_model(config, passages, llm_and_tokenizer, device=torch.device("cpu"))
    # the measurement's own cut: each passage's first doc_tokens tokens, one row each
    cut = [tokenizer(p.text, add_special_tokens=False)["input_ids"][:params["doc_tokens"]] for p in passages]
    rows = DocumentRows(list(passages), cut, list(range(len(passages))), [[i] for i in range(len(passages))],
                        params["doc_tokens"])
    dataset = WritePhaseDataset(rows, tokenizer)
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    trainer = WritePhaseTrainer(model, WriteSettings(lr_z=lr_z, betas_z=list(betas), lr_projection=lr_projection),
                                prepared_objective("reconstruct", model, rows))
    curve, train_s = [], 0.0
    for step in range(1, params["steps"] + 1):
        start = time.perf_counter()
        stats = trainer.train_step(batch)
        train_s += time.perf_counter() - start
        if step % params["eval_every"] == 0 or step == params["steps"]:
            hits, valid = trainer.greedy_hits(batch)
            prefixes = first_mistakes(hits, valid)
            curve.append({"step": step, "seconds": train_s, "loss": stats["loss"], "tf_token_acc": stats.get("token_acc"),
                          "greedy_token_acc": float((hits & valid).sum() / valid.sum()),
                          "capacity": prefix_capacity(hits, valid),
                          "first_mistake_median": float(torch.tensor(prefixes, dtype=torch.float).median()),
                          "exact": sum(int(p == int(n)) for p, n in zip(prefixes, valid.sum(1))),
                          "first_mistakes": prefixes})
    final = curve[-1]
    floats_per_doc = int(model.doc_vectors.shape[1])
    reached = next((c for c in curve if c["greedy_token_acc"] >= params["target_acc"]), None)
    return {"projection": projection, "m": m, "lr_z": lr_z, "betas": list(betas),
            "lr_projection": None if projection == "direct" else lr_projection,
            "to_target": None if reached is None else {"step": reached["step"], "seconds": reached["seconds"]},
            "floats_per_doc": floats_per_doc, "curve": curve, "capacity": final["capacity"],
            "tokens_per_vector": final["capacity"] / m, "s_per_step": train_s / params["steps"],
            "tokens_per_doc": int(batch["doc_mask"].sum(1).min())}


@common.isolated
def run(profile: str = "full", command: str | None = None, threads: int | None = common.DEFAULT_THREADS,
        **overrides) -> dict:
    from pqa_core.modeling.llm import load_llm

    bench = common.Bench(NAME, profile, PROFILES, overrides, threads, command)
    params = bench.params
    llm_and_tokenizer = load_llm(params["llm"])
    passages, source = load_passages(llm_and_tokenizer[1], params["docs"], params["doc_tokens"])
    settings = [run_setting(llm_and_tokenizer, passages, params, tuple(s)) for s in params["settings"]]
    return bench.finish({
        "data": {"source": os.path.relpath(source, common.REPO_ROOT), "passages": [str(p.doc_id) for p in passages]},
        "settings": settings,
    })


def markdown(result: dict) -> str:
    p = result["params"]
    rows = []
    for s in result["settings"]:
        last = s["curve"][-1]
        ceiling = s["capacity"] >= s["tokens_per_doc"]  # every position right: the test's length is the bound
        target = s.get("to_target")
        rows.append([f"`{s['projection']}`", s["m"], f"{s['floats_per_doc']:,}",
                     f"{s['lr_z']:g}, betas {tuple(s['betas'])}",
                     f"**>= {s['capacity']}** (whole length)" if ceiling else f"**{s['capacity']}**",
                     (">= " if ceiling else "") + f"{s['tokens_per_vector']:.1f}", f"{last['first_mistake_median']:.0f}",
                     f"{last['exact']}/{len(result['data']['passages'])}",
                     f"{last['greedy_token_acc']:.2f}", f"{last['tf_token_acc']:.2f}",
                     "not reached" if target is None else f"{target['step']} steps, {target['seconds']:.0f} s",
                     " / ".join(f"{c['greedy_token_acc']:.2f}" for c in s["curve"]), f"{s['s_per_step']:.1f}"])
    table = common.md_table(["projection", "m", "floats/doc", "lr z, betas", "capacity (tokens at >= 90%)",
                             "tokens per vector", "first mistake (median)", "exact", "greedy acc", "teacher-forced acc",
                             f"to {p['target_acc']:.0%} greedy acc",
                             f"greedy acc at steps {', '.join(str(c['step']) for c in result['settings'][0]['curve'])}",
                             "s/step"], rows)
    return common.section(
        "(f) Write-phase capacity vs memory tokens m, and the optimiser of z", result,
        f"Data: {p['docs']} passages of `{result['data']['source']}` ({', '.join(result['data']['passages'])}), "
        f"each cut to its first {p['doc_tokens']} tokens + eos (this measurement's own cut); LLM `{p['llm']}` "
        f"frozen; pqa's `WritePhaseTrainer` with the `reconstruct` objective (row-wise AdamW on z, grad clip 1.0), "
        f"full batch, **{p['steps']} steps per setting**, greedy decoding from the soft prompt alone every "
        f"{p['eval_every']} steps. Capacity = the longest prefix whose pooled greedy token accuracy over all "
        f"passages is >= {TARGET:.0%} (the Cramming paper's measure; it reports ~70-80 tokens per vector for "
        "160M models with thousands of steps per text, AdamW lr 1e-2, betas 0.9/0.9). \"to "
        f"{p['target_acc']:.0%}\": the first evaluation at which greedy token accuracy over all positions reached it, "
        "and the training seconds spent until then.",
        table,
        f"A {p['steps']}-step budget per setting on this CPU is far below the Cramming paper's thousands of steps, "
        "so every capacity here is what that budget reaches, a floor. `direct` stores m x d_model free floats per "
        "document (no shared map); `hybrid` adds a 384-float MiniLM retrieval key (through the shared map, never "
        "moved by the write phase) to the m x d_model free floats.",
    )


def main(argv=None) -> int:
    return common.script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
