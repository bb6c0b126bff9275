"""(c) Training-step overhead: one read-phase step vs a bare HF step of the same LLM on the same tokens.

The read-phase step (``ReadPhaseTrainer.train_step``) does: MiniLM query encoding, cosine
scores over all doc vectors, top-k, projection of k doc vectors to k*m soft tokens, the
peft-wrapped LLM forward over [soft tokens][question][answer] (logits only at the answer),
generation + retrieval loss, backward, grad clipping, AdamW over z, projection, selector,
query-encoder head and LoRA.

The bare step is what a plain HF fine-tune of the same peft-wrapped LLM does on a sequence
of the same length (k*m + question + answer tokens, same padding mask): ``llm(input_ids,
attention_mask, labels)`` (labels only on the answer tokens), backward, clip at 1.0 (HF
Trainer's default), AdamW over the LoRA parameters.

Reported: ratio = read step / bare step (goal <= 1.15). HF's ``labels=`` path computes
logits over the whole sequence while pqa keeps only the answer positions
(``logits_to_keep``), so a second baseline does the bare forward with ``logits_to_keep`` too:
that ratio isolates what pqa's own machinery (selection, soft prompts, extra parameters) costs.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

NAME = "step_overhead"
GOAL = 1.15
PROFILES = {
    "smoke": dict(llm="tiny", batch_size=2, rounds=2, warmup=1),
    "quick": dict(llm="smollm2-135m", batch_size=8, rounds=4, warmup=1),
    "full": dict(llm="smollm2-135m", batch_size=8, rounds=12, warmup=2),
}


def _setup(llm_name: str, batch_size: int, top_k: int = 3, num_memory_tokens: int = 4):
    import torch

    from pqa_core.modeling.builder import build_losses, build_model
    from pqa_core.config import PQAConfig
    from pqa_core.data.loading import ReadPhaseDataset, load_corpus, load_qa, sample_data_path
    from pqa_core.training.read_phase import ReadPhaseTrainer

    config = PQAConfig.from_dict({"model": {"llm": llm_name, "num_memory_tokens": num_memory_tokens,
                                            "lora": {"enabled": True}, "device": "cpu"},
                                  "read": {"top_k": top_k, "batch_size": batch_size}})
    corpus = load_corpus(sample_data_path("corpus.jsonl"))
    questions = load_qa(sample_data_path("qa_train.jsonl"), corpus)[:batch_size]
    model = build_model(config, corpus, device=torch.device("cpu"))
    retrieval_loss, generation_loss = build_losses(config)
    data = config.data
    dataset = ReadPhaseDataset(questions, model.tokenizer, encoder_tokenizer=getattr(model.query_encoder, "tokenizer", None),
                               max_query_length=data.max_query_tokens, max_answer_length=data.max_answer_tokens,
                               prompt=data.prompt)
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    read = config.read
    trainer = ReadPhaseTrainer(model, read, retrieval_loss=retrieval_loss, generation_loss=generation_loss,
                               device=torch.device("cpu"))
    return config, model, trainer, batch


def _bare_steps(model, batch, soft_tokens: int, lr: float):
    """Two bare HF steps on same-shaped token sequences: ``labels=`` (full logits) and ``logits_to_keep``."""
    import torch
    import torch.nn.functional as F

    llm = model.llm
    B = batch["query_ids"].shape[0]
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, model.llm.get_input_embeddings().weight.shape[0], (B, soft_tokens), generator=generator)
    input_ids = torch.cat([prefix, batch["query_ids"], batch["answer_ids"]], dim=1)
    attention_mask = torch.cat([torch.ones_like(prefix), batch["query_mask"], batch["answer_mask"]], dim=1)
    answer_positions = torch.zeros_like(input_ids, dtype=torch.bool)
    answer_positions[:, -batch["answer_ids"].shape[1]:] = batch["answer_mask"].bool()
    labels = input_ids.masked_fill(~answer_positions, -100)
    T = batch["answer_ids"].shape[1]
    answer_labels = batch["answer_ids"].masked_fill(batch["answer_mask"] == 0, -100)
    params = model.lora_parameters()
    optimizer = torch.optim.AdamW(params, lr=lr)

    def finish(loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        optimizer.step()

    def bare_labels():
        llm.train()
        finish(llm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss)

    def bare_keep():
        llm.train()
        # the same slicing pqa does: logits at the T+1 last positions, the first T predict the answer tokens
        logits = llm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                     logits_to_keep=T + 1).logits[:, :T]
        finish(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), answer_labels.reshape(-1),
                               ignore_index=-100))

    return bare_labels, bare_keep, tuple(input_ids.shape)


@common.isolated
def run(profile: str = "quick", command: str | None = None, threads: int | None = common.DEFAULT_THREADS,
        **overrides) -> dict:
    import torch

    bench = common.Bench(NAME, profile, PROFILES, overrides, threads, command)
    params = bench.params
    torch.manual_seed(0)
    config, model, trainer, batch = _setup(params["llm"], params["batch_size"])
    soft_tokens = config.read.top_k * config.model.num_memory_tokens
    bare_labels, bare_keep, shape = _bare_steps(model, batch, soft_tokens, config.read.lr_lora)
    times = common.interleaved({"read_step": lambda: trainer.train_step(batch), "bare_hf_labels": bare_labels,
                                "bare_hf_logits_to_keep": bare_keep},
                               rounds=params["rounds"], warmup=params["warmup"])
    vs_labels = common.ratio_stats(times["read_step"], times["bare_hf_labels"])
    vs_keep = common.ratio_stats(times["read_step"], times["bare_hf_logits_to_keep"])
    trainable_read = sum(p.numel() for p in trainer.trainable)
    trainable_lora = sum(p.numel() for p in model.lora_parameters())
    return bench.finish({
        "setup": {"llm": params["llm"], "lora": True, "top_k": config.read.top_k,
                  "soft_tokens_per_doc": config.model.num_memory_tokens, "num_docs": model.num_docs,
                  "query_encoder": config.query_encoder["name"], "selector": config.selector["name"],
                  "projection": config.projection["name"], "batch_size": shape[0], "sequence_length": shape[1],
                  "answer_tokens": int(batch["answer_ids"].shape[1]),
                  "trainable_params_read_step": trainable_read, "trainable_params_bare": trainable_lora},
        "seconds": times,
        "median_s": {k: common.median(v) for k, v in times.items()},
        "ratio_vs_bare_labels": vs_labels,
        "ratio_vs_bare_logits_to_keep": vs_keep,
        "goal": {"metric": "read_step / bare_hf_labels (median)", "target": f"<= {GOAL}",
                 "value": vs_labels["ratio_of_medians"], "met": vs_labels["ratio_of_medians"] <= GOAL},
    })


def markdown(result: dict) -> str:
    s, m = result["setup"], result["median_s"]
    lab, keep, goal = result["ratio_vs_bare_labels"], result["ratio_vs_bare_logits_to_keep"], result["goal"]
    rows = [
        ["read-phase step (`ReadPhaseTrainer.train_step`)", m["read_step"] * 1000, "1", "-"],
        ["bare HF step, `llm(input_ids, labels=...)`", m["bare_hf_labels"] * 1000,
         f"{lab['ratio_of_medians']:.3f}", common.ratio_span(lab)],
        ["bare HF step, `logits_to_keep=T+1` + CE", m["bare_hf_logits_to_keep"] * 1000,
         f"{keep['ratio_of_medians']:.3f}", common.ratio_span(keep)],
    ]
    table = common.md_table(["step", "median ms", "read step / this", "per-round ratio range"], rows)
    return common.section(
        "(c) Training-step overhead", result,
        f"{s['llm']} with LoRA, top_k={s['top_k']}, m={s['soft_tokens_per_doc']} soft tokens per document, "
        f"query encoder `{s['query_encoder']}`, selector `{s['selector']}` over {s['num_docs']} doc vectors, "
        f"projection `{s['projection']}`; batch {s['batch_size']} x {s['sequence_length']} positions "
        f"({s['top_k'] * s['soft_tokens_per_doc']} soft + question + {s['answer_tokens']} answer) on both sides; "
        f"{result['params']['rounds']} interleaved rounds after {result['params']['warmup']} warm-up. "
        f"Trainable parameters: {s['trainable_params_read_step']:,} (read step) vs {s['trainable_params_bare']:,} (LoRA only).",
        table,
        f"Goal: read step / bare HF step <= {GOAL}: **{goal['value']:.3f}, {common.verdict(goal['met'])}**. "
        f"Against a bare step that also keeps only the answer logits, the ratio is "
        f"{keep['ratio_of_medians']:.3f}: that is the cost of selection (MiniLM encoding, scores, top-k), "
        f"the projection to soft tokens and the extra parameters alone.",
    )


def main(argv=None) -> int:
    return common.script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
