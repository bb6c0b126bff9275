"""(l) Do the soft tokens carry the passage? Reconstruction from a passage's own soft tokens vs another's.

A writer's soft tokens can lower the reader's loss on a passage in two ways: by saying what passages of
this kind look like (any passage's tokens would do as well) or by saying what *this* passage says. Only
the second is the document in the vector. For each writer, every passage's first ``tokens`` tokens are
scored (nats per token, teacher-forced, the reader that goes with the writer) twice: after its own soft
tokens and after those of another passage of the same set (the one half the set away). The difference
(other - own), paired over passages with its 95% interval and p-value, is what the vectors carry of
their own passage; the plain LLM with no soft tokens at all is the floor.

Writers: ``keywords`` (the base LLM reads the salient words' embeddings) and each ``--artifact
NAME=PATH`` (a pretrained artifact: its writer writes, its reader LoRA reads). The passages are bench
(a)'s (the first articles of shared/data, never in a pretraining corpus), else the shipped sample.

    python bench/carry.py --quick --artifact encoder=pqa_core/pretrained/smollm2-135m/pqa
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

NAME = "carry"
PROFILES = {
    "smoke": dict(llm="tiny", documents=8, tokens=16, m=2, batch_size=4),
    "quick": dict(llm="smollm2-135m", documents=64, tokens=64, m=32, batch_size=8),
    "full": dict(llm="smollm2-135m", documents=200, tokens=64, m=32, batch_size=8),
}


def passage_losses(model, rows, targets, partner, batch_size: int):
    """Per row: (nats/token after its own soft tokens, after ``partner[row]``'s, with none)."""
    import torch

    from pqa_core.data.loading import pad_sequences
    from pqa_core.modeling.model import nats_per_row

    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id or 0
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out = {"own": [], "other": [], "none": []}
    model.eval()
    with torch.no_grad(), model.autocast():
        for first in range(0, len(rows), batch_size):
            part = rows[first:first + batch_size]
            ids, mask = pad_sequences([targets[r] for r in part], pad, "right")
            for name, prefix_rows in (("own", part), ("other", [partner[r] for r in part]), ("none", None)):
                prefix = model.soft_prompts(torch.tensor(prefix_rows)[:, None]) if prefix_rows else None
                # with no soft tokens, a start token predicts the first token of the text
                context = ids[:, :0] if prefix_rows else torch.full((len(part), 1), start, dtype=ids.dtype)
                logits, labels = model.continuation_logits(prefix, context, torch.ones_like(context), ids, mask)
                out[name] += nats_per_row(logits, labels).tolist()
    return out


def check_against(against: str, artifacts) -> None:
    """``against`` names a writer the run compares: keywords or one of the artifacts."""
    if against != "keywords" and against not in (artifacts or {}):
        raise ValueError(f"--against {against!r}: neither keywords nor an --artifact name")


def run(profile: str = "quick", command: str | None = None, threads: int | None = common.DEFAULT_THREADS,
        artifacts=None, against: str = "keywords", **overrides) -> dict:
    import torch

    from pqa_core.config import PQAConfig
    from pqa_core.data.loading import split_passages
    from pqa_core.evaluation.stats import paired_comparison
    from pqa_core.modeling.builder import build_model
    from pqa_core.modeling.llm import load_llm
    from pqa_core.storage.pretrained import read_manifest, saved_shape

    check_against(against, artifacts)
    bench = common.Bench(NAME, profile, PROFILES, overrides, threads, command)
    p = bench.params
    documents, source = common.squad_passages(p["documents"], "first")
    llm, tokenizer = load_llm(p["llm"])
    passages = split_passages(documents, tokenizer, 256)
    rows = [passages.rows_of_passage[i][0] for i in range(len(documents))]  # each passage's first row
    targets = {r: list(passages.tokens[r])[:p["tokens"]] for r in rows}
    partner = {r: rows[(i + len(rows) // 2) % len(rows)] for i, r in enumerate(rows)}
    variants = {"keywords": {"writer": {"name": "keywords"}}}
    for name, path in (artifacts or {}).items():  # the writer and m the artifact was made with
        shape = saved_shape(read_manifest(str(path)))
        variants[name] = {"writer": shape["writer"],
                          "model": {"pretrained": str(path), "num_memory_tokens": shape["num_memory_tokens"]}}
    found = {}
    for name, extra in variants.items():
        torch.manual_seed(0)
        config = PQAConfig.from_dict({"seed": 0, "writer": extra["writer"],
                                      "model": {"llm": p["llm"], "num_memory_tokens": p["m"], **extra.get("model", {}),
                                                **({"lora": {"enabled": False}} if name == "keywords" else {})}})
        model = build_model(config, passages.documents, (load_llm(p["llm"]) if found else (llm, tokenizer)),
                            row_tokens=passages.tokens)
        losses = passage_losses(model, rows, targets, partner, p["batch_size"])
        carried = paired_comparison(losses["other"], losses["own"], metric="nats/token (other - own)")
        helped = paired_comparison(losses["none"], losses["own"], metric="nats/token (none - own)")
        found[name] = {"m": config.model.num_memory_tokens,
                       "own": sum(losses["own"]) / len(rows), "other": sum(losses["other"]) / len(rows),
                       "none": sum(losses["none"]) / len(rows), "carried": carried.to_dict(),
                       "helped": helped.to_dict(), "per_passage": losses}
    base = found[against]["per_passage"]
    for name, w in found.items():  # what each writer carries more than ``against``, paired over passages
        if name != against:
            mine = w["per_passage"]
            w["vs"] = paired_comparison([o - s for o, s in zip(mine["other"], mine["own"])],
                                        [o - s for o, s in zip(base["other"], base["own"])],
                                        metric=f"carried - carried by {against}").to_dict()
    return bench.finish({"setup": {"llm": p["llm"], "passages": len(rows), "source": source, "m": p["m"],
                                   "tokens": p["tokens"], "artifacts": {k: str(v) for k, v in (artifacts or {}).items()}},
                         "against": against, "writers": found})


def markdown(result: dict) -> str:
    s = result["setup"]
    rows = []
    for name, w in result["writers"].items():
        c = w["carried"]
        v = w.get("vs")
        rows.append([name, str(w.get("m", s["m"])), f"{w['none']:.3f}", f"{w['own']:.3f}", f"{w['other']:.3f}",
                     f"{c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]", f"{c['p_value']:.3g}",
                     f"{v['difference']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}], p = {v['p_value']:.3g}" if v else ""])
    against = result.get("against", "keywords")
    table = common.md_table(["writer (reader)", "m", "no soft tokens", "own soft tokens", "another passage's",
                             "carried: other - own [95%]", "p", f"carried - {against}'s [95%] (paired)"], rows)
    artifacts = ", ".join(f"{k} = `{v}`" for k, v in s["artifacts"].items()) or "none"
    return common.section(
        "(l) Do the soft tokens carry the passage? Own vs another passage's", result,
        f"{s['passages']} passages of {s['source']}, {s['llm']}, m soft tokens (an artifact's own; keywords: "
        f"{s['m']}): nats per token of each passage's first "
        f"{s['tokens']} tokens, teacher-forced, after nothing, after its own soft tokens, after another passage's "
        f"(half the set away). Artifacts: {artifacts} (their writer writes, their reader LoRA reads; `keywords` is "
        "read by the plain LLM).",
        table,
        "Read: a writer whose `carried` interval includes 0 writes one prefix for every passage (it says what a "
        "passage looks like, not what this one says), however much it lowers the loss against no soft tokens.")


def add_arguments(parser) -> None:
    parser.add_argument("--artifact", action="append", default=[], metavar="NAME=PATH",
                        help="a pretrained artifact (folder, run folder or shipped:LLM/READER) to compare; repeatable")
    parser.add_argument("--against", default="keywords", metavar="NAME",
                        help="the writer every other one's carried is compared with, paired (default: keywords)")


def run_kwargs(args, out) -> dict:
    artifacts = {}
    for item in args.artifact:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: --artifact {item!r}: expected NAME=PATH")
        artifacts[name] = path
    try:
        check_against(args.against, artifacts)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    return {"artifacts": artifacts, "against": args.against}


def main(argv=None) -> int:
    return common.script_main(sys.modules[__name__], argv, add_arguments=add_arguments, run_kwargs=run_kwargs)


if __name__ == "__main__":
    sys.exit(main())
