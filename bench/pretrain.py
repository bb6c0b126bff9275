"""Build the pretrained artifacts (``pqa run pretrain``) on the SQuAD articles no benchmark uses.

bench (a) uses the first 24 articles of ``shared/data/squad_v1.1``; this script takes the articles after
them (by default all 16 that are left: 685 passages, 3,285 questions), holds out ``--held-out`` of their
questions (by question, seeded) to score each artifact, and runs one tracked ``pqa run pretrain`` per
reader: ``pqa`` (the encoder writer, the reader LoRA, the projection), ``closed_book`` and optionally
``text`` (the controls' readers, trained with the same steps and learning rate). Each run is resumable:
run the same command again after an interruption, or with a larger ``--max-steps`` or ``--epochs`` to go
on from where a budget stopped it (a smaller one than an output folder's training is refused: another
``--out``). With ``--ship`` the artifacts are copied into
``pqa_core/pretrained/<llm>/<reader>/`` (what ``pqa demo`` starts from), beside a README saying how they
were made; ``--ship-variant NAME`` ships ``<reader>-NAME`` beside them instead of replacing them.

    # the shipped artifacts bench (a) uses (about 3 h + 20 min on this 2-core machine; 160 steps: 45 + 8 min):
    python bench/pretrain.py --readers pqa --questions 1600 --held-out 200 --epochs 2 --max-steps 400 \
        --reconstruct-only-steps 100 --ship
    python bench/pretrain.py --readers closed_book --questions 1600 --held-out 200 --epochs 2 --max-steps 400 --ship
    # bench (a)'s keyword-vector reader, pretrained alike (30 min): --variant '{"model": {"pretrained": "<out>/pqa"}}'
    # distillation from the LLM reading the gold passage (PISCO's objective) on top of the answer loss:
    python bench/pretrain.py --readers pqa --questions 1600 --held-out 200 --epochs 2 --max-steps 160 \
        --reconstruct-only-steps 100 --distill 1.0 --out outputs/pretrain_distill
    # ... with a pretrained text reader as the teacher (one that answers in spans, as the task does):
    python bench/pretrain.py --readers pqa --questions 1600 --held-out 200 --epochs 2 --max-steps 160 \
        --reconstruct-only-steps 100 --distill 1.0 --teacher outputs/pretrain/text --out outputs/pretrain_taught
    python bench/pretrain.py --readers pqa --writer keywords --questions 1600 --held-out 200 --epochs 2 --max-steps 60
    # the shipped variant pqa-keywords-m64 (86 min): with its write phase and read.lr_z=0, the best row on
    # bench (a)'s new articles
    python bench/pretrain.py --readers pqa --writer keywords --questions 1600 --held-out 200 --epochs 2 \
        --max-steps 200 --m 64 --ship --ship-variant keywords-m64
    # the shipped variant pqa-sentences-m64 (84 min): with read.lr_z=0, the best row on the question split
    python bench/pretrain.py --readers pqa --writer sentences --questions 1600 --held-out 200 --epochs 2 \
        --max-steps 200 --m 64 --ship --ship-variant sentences-m64
    # the encoder anchored on those sentence tokens (learns what they leave out of the passage)
    python bench/pretrain.py --readers pqa --writer encoder --questions 1600 --held-out 200 --epochs 2 \
        --max-steps 200 --m 64 --set writer.anchor=sentences --out outputs/pretrain_encoder_sentences
    # the text reader (oracle, text RAG): about 70 s a step of 8 questions here, 160 steps ~3 h
    python bench/pretrain.py --readers text --questions 1600 --held-out 200 --epochs 2 --max-steps 160 --ship

Everything the runs take is given on the command line and recorded (Sacred, and each artifact's manifest).
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO_ROOT, SQUAD_DIR  # noqa: E402
from bench.quality import _write_jsonl  # noqa: E402

BENCH_ARTICLES = 24  # bench (a) full: 20 articles + 4 new ones; every later article is unused by it
SHIPPED = REPO_ROOT / "pqa_core" / "pretrained"


def build_data(out: Path, questions: int, held_out: int, seed: int = 0, squad_dir: Path = SQUAD_DIR) -> dict:
    """corpus/train/held-out files of the unused articles; returns their paths and counts."""
    corpus = [json.loads(line) for line in open(squad_dir / "corpus.jsonl", encoding="utf-8")]
    qa = [json.loads(line) for line in open(squad_dir / "qa.jsonl", encoding="utf-8")]
    titles = list(dict.fromkeys(d["title"] for d in corpus))
    unused = set(titles[BENCH_ARTICLES:])
    docs = [d for d in corpus if d["title"] in unused]
    ids = {d["doc_id"] for d in docs}
    pool = [q for q in qa if set(q["gold_doc_ids"]) <= ids]
    random.Random(seed).shuffle(pool)
    evaluation, train = pool[:held_out], pool[held_out:held_out + questions]
    return {"corpus": _write_jsonl(out / "corpus.jsonl", docs), "qa": _write_jsonl(out / "train.jsonl", train),
            "eval_qa": _write_jsonl(out / "eval.jsonl", evaluation),
            "about": {"articles": sorted(unused, key=titles.index), "passages": len(docs),
                      "train_questions": len(train), "held_out_questions": len(evaluation)}}


def pretrain_command(reader: str, data: dict, out: Path, args) -> list:
    values = [f"model.llm={args.llm}", f"data.corpus={data['corpus']}", f"data.qa={data['qa']}",
              f"data.eval_qa={data['eval_qa']}", f"pretrain.reader={reader}", f"pretrain.epochs={args.epochs}",
              f"pretrain.batch_size={args.batch_size}", f"pretrain.max_steps={args.max_steps}",
              f"threads={args.threads}", f"output_dir={out}",
              f"model.num_memory_tokens={args.m}"]
    if reader == "pqa":  # the controls' readers read text or nothing: no writer to train
        values += [f"writer.name={args.writer}",
                   *([f"writer.layers={args.writer_layers}"] if "layers" in writer_parameters(args.writer) else []),
                   f"pretrain.reconstruct_only_steps={args.reconstruct_only_steps}",
                   f"pretrain.contrast_weight={args.contrast_weight}"]
    if args.distill and reader == "pqa":  # a control's reader (text, closed_book) learns from the answers alone
        values += ["generation_loss.name=kl_distill", f"generation_loss.alpha={args.distill}"]
        if args.teacher:
            values.append(f"generation_loss.teacher_adapter={args.teacher.resolve()}")
    values += list(args.set)
    if (out / "checkpoints" / "pretrain").exists():
        values.append(f"resume={out}")
    return [str(REPO_ROOT / ".venv" / "bin" / "pqa"), "run", "pretrain", "--json", "with", *values]


def writer_parameters(name: str) -> dict:
    """The parameters writer ``name`` takes (``--writer-layers`` goes only to a writer with ``layers``)."""
    from pqa_core.components import plugins

    plugins.load_plugins()
    return plugins.component_defaults("writer", name)


def shipped_name(reader: str, variant: str) -> str:
    """The folder under ``pqa_core/pretrained/<llm>/``: the reader's name (what ``model.pretrained=auto``
    takes), or ``<reader>-<variant>`` beside it (named by ``model.pretrained=shipped:<llm>/<reader>-<variant>``)."""
    if variant and not all(part.isalnum() for part in variant.split("-")):
        raise SystemExit(f"--ship-variant {variant!r}: letters, digits and single dashes only (e.g. keywords-m64)")
    return f"{reader}-{variant}" if variant else reader


def run_settings(llm: str, name: str, manifest: dict) -> list:
    """The ``KEY=VALUE`` settings a run starts from shipped artifact ``name`` with: the LLM, the artifact,
    and every setting its shape (``check_fits_run``) differs from the defaults in: m, LoRA, writer and
    projection parameters for a pqa reader; the control for a closed-book or text reader."""
    from pqa_core.config import PQAConfig
    from pqa_core.storage.pretrained import saved_shape, shape_of

    shape, reader = saved_shape(manifest), manifest["reader"]
    settings = [f"model.llm={llm}", f"model.pretrained=shipped:{llm}/{name}"]
    if reader != "pqa":  # a text reader fits any control that reads text: oracle is one
        settings.append("control.name=" + ("closed_book" if reader == "closed_book" else "oracle"))
    sections = {kind: {"name": shape[kind]["name"]} for kind in ("writer", "projection")
                if reader == "pqa" and isinstance(shape.get(kind), dict)}
    default = shape_of(PQAConfig.from_dict({"model": {"llm": llm}, **sections}), shape.get("d_model"))
    if reader == "pqa" and shape["num_memory_tokens"] != default["num_memory_tokens"]:
        settings.append(f"model.num_memory_tokens={shape['num_memory_tokens']}")
    for key, value in (shape.get("lora") or {}).items():
        if value != (default["lora"] or {}).get(key):
            settings.append(f"model.lora.{key}={json.dumps(value)}")
    for kind, section in sections.items():
        for key, value in shape[kind].items():
            if key == "name" or value != default[kind].get(key):
                settings.append(f"{kind}.{key}={value if isinstance(value, str) else json.dumps(value)}")
    return settings


def ship(llm: str, reader: str, artifact: Path, data: dict, command: list, seconds: float, variant: str = "") -> Path:
    name = shipped_name(reader, variant)
    target = SHIPPED / llm / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(artifact, target)
    manifest = json.loads((artifact / "MANIFEST.json").read_text())
    trained = manifest["training"].get("seconds")  # summed over resumes; this process's time may be a re-score
    took = (f"{trained / 60:.0f} min of training" if trained is not None
            else f"{seconds / 60:.0f} min for this command, which resumed an earlier run")
    about = data["about"]
    use = shlex.join(run_settings(llm, name, manifest))
    (target / "README.md").write_text(f"""# {llm} — pretrained {reader} reader{f" ({variant})" if variant else ""}

Start a run from it: `{use}`{" (what `model.pretrained=auto` takes)" if not variant else ""}.

Made by `python bench/pretrain.py` with: `{shlex.join(command)}` ({took} on this project's
2-core CPU machine). Files: `model.safetensors` (tensors), `contents.json` (hashes of the pretraining passages
and questions: a run refuses this artifact when its evaluation overlaps them), `MANIFEST.json` (what made it,
the sha256 of every file).

Data: SQuAD v1.1 development set, the {len(about['articles'])} articles after the first {BENCH_ARTICLES} of
`shared/data/squad_v1.1` (none of them used by any benchmark): {about['passages']} passages,
{about['train_questions']} training questions ({about['held_out_questions']} held out to score it:
{json.dumps({k: round(v, 1) for k, v in manifest['training']['metrics'].items() if k.startswith('eval_') and 'ci95' not in k})}).
SQuAD: Rajpurkar et al., 2016, arXiv:1606.05250, licensed CC BY-SA 4.0; these weights are derived from it
and are shared under the same licence (CC BY-SA 4.0).
Articles: {', '.join(about['articles'])}.
""")
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", nargs="+", default=["pqa", "closed_book"], choices=["pqa", "closed_book", "text"])
    parser.add_argument("--llm", default="smollm2-135m")
    parser.add_argument("--questions", type=int, default=3285, help="training questions (at most all of them)")
    parser.add_argument("--held-out", type=int, default=200, help="questions held out to score each artifact")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: every step)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--writer", default="encoder")
    parser.add_argument("--writer-layers", type=int, default=4)
    parser.add_argument("--m", type=int, default=32, help="soft tokens per document")
    parser.add_argument("--reconstruct-only-steps", type=int, default=0,
                        help="pqa: the first steps train the writer by reconstruction alone (ICAE's order)")
    parser.add_argument("--contrast-weight", type=float, default=1.0,
                        help="weight of the own-vs-another-passage margin loss on reconstruction (0: off)")
    parser.add_argument("--distill", type=float, default=0.0, metavar="ALPHA",
                        help="> 0: the answer loss adds ALPHA x KL to the LLM reading the gold passage as text "
                             "(generation_loss=kl_distill; PISCO's teacher); the pqa reader only")
    parser.add_argument("--teacher", type=Path, default=None, metavar="TEXT_READER",
                        help="with --distill: the teacher is this trained text reader (e.g. OUT/text from "
                             "--readers text), not the LLM with its adapter off")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any further config override of the runs (Sacred's `with KEY=VALUE`); repeatable")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("outputs/pretrain"))
    parser.add_argument("--ship", action="store_true", help="copy the artifacts into pqa_core/pretrained/")
    parser.add_argument("--ship-variant", default="", metavar="NAME",
                        help="with --ship: ship as pqa_core/pretrained/<llm>/<reader>-NAME beside the default "
                             "artifacts (model.pretrained=shipped:<llm>/<reader>-NAME) instead of replacing them")
    args = parser.parse_args(argv)
    if args.ship_variant:  # refused before hours of training, not after
        if not args.ship:
            parser.error("--ship-variant names what --ship ships: give both")
        shipped_name("pqa", args.ship_variant)
    data = build_data(args.out / "data", args.questions, args.held_out)
    print(json.dumps(data["about"]), file=sys.stderr)
    for reader in args.readers:
        out = (args.out / reader).resolve()
        command = pretrain_command(reader, data, out, args)
        print("$", shlex.join(command), file=sys.stderr)
        start = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - start
        print(f"{reader}: {seconds / 60:.1f} min -> {out / 'pretrained'}", file=sys.stderr)
        if args.ship:
            print(f"shipped: {ship(args.llm, reader, out / 'pretrained', data, command, seconds, args.ship_variant)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
