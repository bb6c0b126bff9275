"""Pretraining (issue 17) on the tiny model: ``pqa run pretrain`` saves a resumable artifact, a run starts from
it and records it, a mismatched or overlapping one is refused before the run exists, and the encoder writer
trains and writes a batch of documents in one pass."""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pqa_core.config import PQAConfig
from pqa_core.errors import CheckpointError, UsageError
from pqa_core.data.loading import load_corpus, load_qa, sample_data_path
from pqa_core.pipeline import Pipeline
from pqa_core.storage import pretrained as artifacts
from pqa_core.training.loop import RecordingLogger

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]
TINY = {"llm": "tiny", "num_memory_tokens": 2, "lora": {"r": 4}}
ENCODER = {"name": "encoder", "layers": 1, "batch_size": 4}


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """The sample cut in two: pretraining data (28 passages and their questions) and a run's evaluation
    (questions about the other 8 passages), disjoint."""
    root = tmp_path_factory.mktemp("split")
    corpus = load_corpus(sample_data_path("corpus.jsonl"))
    questions = load_qa(sample_data_path("qa_train.jsonl"), corpus) + load_qa(sample_data_path("qa_eval.jsonl"), corpus)
    old = {d.doc_id for d in corpus[:28]}
    row = lambda q: {"id": q.id, "question": q.question, "answers": q.answers, "gold_doc_ids": q.gold_doc_ids}  # noqa: E731
    docs = lambda ds: [{"doc_id": d.doc_id, "title": d.title, "text": d.text} for d in ds]  # noqa: E731
    pre = [row(q) for q in questions if set(q.gold_doc_ids) <= old]
    new = [row(q) for q in questions if not set(q.gold_doc_ids) & old]
    return {"pre_corpus": _jsonl(root / "pre_corpus.jsonl", docs(corpus[:28])),
            # 104 pretraining questions: 13 batches of 8, so a step falls after the last periodic checkpoint
            "pre_qa": _jsonl(root / "pre_qa.jsonl", pre[:104]), "pre_eval": _jsonl(root / "pre_eval.jsonl", pre[-8:]),
            "corpus": _jsonl(root / "corpus.jsonl", docs(corpus)),
            "qa": _jsonl(root / "qa.jsonl", new[:16]), "eval_qa": _jsonl(root / "eval.jsonl", new[16:32])}


def pretrain_config(split, out: Path, **pretrain) -> PQAConfig:
    return PQAConfig.from_dict({
        "seed": 1, "output_dir": str(out), "phases": ["pretrain"], "model": TINY, "writer": ENCODER,
        "data": {"corpus": split["pre_corpus"], "qa": split["pre_qa"], "eval_qa": split["pre_eval"]},
        "pretrain": {"epochs": 2, "batch_size": 8, "checkpoint_every": 3, "reconstruct_tokens": 8, **pretrain},
        "eval": {"max_new_tokens": 4}})


@pytest.fixture(scope="module")
def artifact(split, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    logger = RecordingLogger()
    metrics = Pipeline(pretrain_config(split, out), logger).run()
    return out, logger, metrics


def test_pretraining_saves_an_artifact_that_records_what_made_it(artifact, split):
    out, logger, metrics = artifact
    manifest = artifacts.read_manifest(str(out))  # a run's folder names its pretrained/ artifact
    assert Path(manifest["path"]) == out / "pretrained"
    assert manifest["reader"] == "pqa" and manifest["llm"]["name"] == "tiny"
    assert manifest["shape"]["num_memory_tokens"] == 2 and manifest["shape"]["writer"]["name"] == "encoder"
    assert manifest["data"]["questions"] == len(load_qa(split["pre_qa"], load_corpus(split["pre_corpus"])))
    assert manifest["data"]["corpus_sha256"] and manifest["training"]["steps"] > 0
    assert manifest["fingerprint"] == logger.info["fingerprint"]
    assert manifest["training"]["generation_loss"] == {"name": "ce"} and manifest["training"]["seed"] == 1
    assert manifest["training"]["retrieval_loss"]["name"] == PQAConfig().retrieval_loss["name"]
    tensors = load_file(str(out / "pretrained" / "model.safetensors"))
    parts = {key.split(".")[0] for key in tensors}
    assert parts == {"lora", "writer"}  # hybrid's key map shapes no soft token (key_in_prompt=false): left out
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert "eval_F1" in metrics and logger.info["pretrained_artifact"] == str((out / "pretrained").resolve())
    answered = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(answered) == metrics["eval_questions"] == 8  # each held-out answer kept: artifacts compare paired
    assert str(out / "predictions.jsonl") in logger.artifacts
    losses = [v for _, v in logger.scalars["pretrain.epoch_total_loss"]]
    assert len(losses) == 2 and losses[1] < losses[0]  # the reader and the writer learn together
    # an edited artifact is refused, naming the file
    broken = out.parent / "broken"
    shutil.copytree(out / "pretrained", broken)
    (broken / "contents.json").write_text("{}")
    with pytest.raises(Exception, match="contents.json"):
        artifacts.read_manifest(str(broken))


def test_pretraining_distils_the_llm_reading_the_gold_passage(artifact, split, tmp_path):
    """generation_loss=kl_distill in pretraining (PISCO's teacher): the answer loss adds the KL to the LLM
    reading the gold passage as text, so from the same weights its first step's loss exceeds plain
    cross-entropy's; the artifact records the loss it was trained with."""
    _, plain, _ = artifact
    config = pretrain_config(split, tmp_path / "run", max_steps=1, checkpoint_every=0)
    config = PQAConfig.from_dict({**config.to_dict(), "generation_loss": {"name": "kl_distill", "alpha": 2.0}})
    logger = RecordingLogger()
    Pipeline(config, logger).run()
    (step, distilled), = logger.scalars["pretrain.answer_loss"]
    assert step == 1 and distilled > plain.scalars["pretrain.answer_loss"][0][1] + 1e-4
    recorded = artifacts.read_manifest(str(tmp_path / "run"))["training"]["generation_loss"]
    assert recorded == {"name": "kl_distill", "alpha": 2.0, "temperature": 1.0, "teacher_adapter": ""}


def test_pretraining_resumed_after_a_crash_ends_with_the_same_artifact(artifact, split, tmp_path):
    out, _, _ = artifact
    crashed = tmp_path / "crashed"
    Pipeline(pretrain_config(split, crashed)).run()
    steps = sorted((crashed / "checkpoints" / "pretrain").glob("step-*"))
    assert len(steps) >= 2
    for later in [crashed / "checkpoints" / "pretrain" / "final", crashed / "pretrained", *steps[1:]]:
        shutil.rmtree(later)  # as if killed after the first step checkpoint
    config = pretrain_config(split, crashed)
    config.resume = str(crashed)
    Pipeline(config).run()
    resumed = load_file(str(crashed / "pretrained" / "model.safetensors"))
    whole = load_file(str(out / "pretrained" / "model.safetensors"))
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def grow_to_straight(split, tmp_path, done: int, steps: int) -> None:
    """Resume ``tmp_path/run`` (stopped at ``done`` steps) with a budget of ``steps``: it trains only the steps
    added and ends with the artifact a run with that budget from the start makes."""
    grown = pretrain_config(split, tmp_path / "run", max_steps=steps, checkpoint_every=0)
    grown.resume = str(tmp_path / "run")
    logger = RecordingLogger()
    Pipeline(grown, logger).run()
    assert [step for step, _ in logger.scalars["pretrain.answer_loss"]] == list(range(done + 1, steps + 1))
    Pipeline(pretrain_config(split, tmp_path / "straight", max_steps=steps, checkpoint_every=0)).run()
    went_on = load_file(str(tmp_path / "run" / "pretrained" / "model.safetensors"))
    straight = load_file(str(tmp_path / "straight" / "pretrained" / "model.safetensors"))
    assert all(torch.equal(went_on[k], straight[k]) for k in straight)


def test_a_step_budget_ends_pretraining_early_and_the_artifact_says_so(split, tmp_path):
    logger = RecordingLogger()
    Pipeline(pretrain_config(split, tmp_path / "run", max_steps=4, checkpoint_every=0), logger).run()
    assert [step for step, _ in logger.scalars["pretrain.answer_loss"]] == [1, 2, 3, 4]
    first = artifacts.read_manifest(str(tmp_path / "run"))["training"]
    assert first["steps"] == 4 and first["seconds"] > 0
    # a larger budget goes on from where the first stopped, to the artifact a run with it from the start makes
    grow_to_straight(split, tmp_path, 4, 6)
    went_on = artifacts.read_manifest(str(tmp_path / "run"))["training"]
    assert went_on["steps"] == 6
    stopped = json.loads((tmp_path / "run" / "checkpoints" / "pretrain" / "step-0000004" / "state.json").read_text())
    assert 0 < stopped["seconds"] <= first["seconds"]
    assert went_on["seconds"] > stopped["seconds"]  # the step checkpoint's time and the second process's, summed
    # a smaller budget than the weights had is refused before the run: the artifact would say 4 steps
    smaller = pretrain_config(split, tmp_path / "run", max_steps=4, checkpoint_every=0)
    smaller.resume = str(tmp_path / "run")
    with pytest.raises(UsageError, match=r"the pretrain phase already trained 6 steps .* asks for 4 steps "
                                         r"\(pretrain\.epochs, pretrain\.max_steps\)"):
        Pipeline(smaller)


def test_pretraining_killed_at_its_budget_before_the_final_checkpoint_ends_that_epoch_once(split, tmp_path):
    """Killed between the step checkpoint at a budget's stop (the end of the first epoch: 13 batches) and the
    final one: resumed, it writes the final with the epoch's averages and trains nothing; a larger budget
    then goes on to the artifact a run with that budget from the start makes, no epoch trained twice."""
    Pipeline(pretrain_config(split, tmp_path / "run", max_steps=13, checkpoint_every=0)).run()
    final = tmp_path / "run" / "checkpoints" / "pretrain" / "final"
    written = json.loads((final / "state.json").read_text())
    shutil.rmtree(final)
    again = pretrain_config(split, tmp_path / "run", max_steps=13, checkpoint_every=0)
    again.resume = str(tmp_path / "run")
    logger = RecordingLogger()
    Pipeline(again, logger).run()
    assert "pretrain.answer_loss" not in logger.scalars
    rewritten = json.loads((final / "state.json").read_text())
    assert (rewritten["step"], rewritten["epoch"]) == (written["step"], written["epoch"]) == (13, 1)
    assert rewritten["metrics"] == written["metrics"] and "epoch_answer_loss" in written["metrics"]
    grow_to_straight(split, tmp_path, 13, 15)


def test_a_finished_pretraining_resumed_is_loaded_not_trained_again(split, tmp_path):
    """Its final checkpoint holds every step (state.json's step): no step after the last periodic checkpoint
    is redone."""
    first = RecordingLogger()
    Pipeline(pretrain_config(split, tmp_path / "run", epochs=1, checkpoint_every=2), first).run()
    steps = [step for step, _ in first.scalars["pretrain.answer_loss"]]
    assert len(steps) % 2 == 1  # the last step is after the last periodic checkpoint
    training = artifacts.read_manifest(str(tmp_path / "run"))["training"]
    trained = training["metrics"]
    shutil.rmtree(tmp_path / "run" / "pretrained")  # the run resumed writes it again
    again = pretrain_config(split, tmp_path / "run", epochs=1, checkpoint_every=2)
    again.resume = str(tmp_path / "run")
    logger = RecordingLogger()
    Pipeline(again, logger).run()
    assert "pretrain.answer_loss" not in logger.scalars
    # the artifact written again keeps the training's epoch averages and time, not only the new run's scores
    again_training = artifacts.read_manifest(str(tmp_path / "run"))["training"]
    assert again_training["metrics"] == trained
    assert training["seconds"] is not None and again_training["seconds"] == training["seconds"]
    assert "epoch_answer_loss" in trained


def test_a_closed_book_pretraining_saves_its_reader_with_its_training_time(split, tmp_path):
    """pretrain.reader=closed_book trains a control's reader (ControlReaderTrainer) into an artifact that
    records its steps and training time, as pqa's does."""
    Pipeline(pretrain_config(split, tmp_path / "cb", reader="closed_book", max_steps=2, checkpoint_every=0)).run()
    manifest = artifacts.read_manifest(str(tmp_path / "cb"))
    assert manifest["reader"] == "closed_book" and manifest["training"]["steps"] == 2
    assert manifest["training"]["seconds"] > 0


def test_a_warm_up_reconstructs_alone_before_questions(split, tmp_path):
    """ICAE's order: the first pretrain.reconstruct_only_steps train the writer by reconstruction alone (no
    answer loss), then both; a control reader has no writer to warm up (refused, one line)."""
    logger = RecordingLogger()
    config = pretrain_config(split, tmp_path / "run", max_steps=4, checkpoint_every=0, reconstruct_only_steps=2)
    pipeline = Pipeline(config, logger)
    memory = pipeline.model.writer.memory.detach().clone()
    pipeline.run()
    assert [step for step, _ in logger.scalars["pretrain.answer_loss"]] == [3, 4]
    assert [step for step, _ in logger.scalars["pretrain.reconstruct_loss"]] == [1, 2, 3, 4]
    assert not torch.equal(pipeline.model.writer.memory.detach(), memory)  # the warm-up trained the writer
    assert artifacts.read_manifest(str(tmp_path / "run"))["training"]["reconstruct_only_steps"] == 2
    with pytest.raises(Exception, match="reconstruct_only_steps.*pretrain.reader=closed_book"):
        pretrain_config(split, tmp_path / "cb", reader="closed_book", reconstruct_only_steps=2)


def test_the_contrast_term_reaches_pretraining_and_is_recorded(split, tmp_path):
    """pretrain.contrast_weight puts the own-vs-another-passage term into the reconstruction: the run records
    what the batch's soft tokens carry (other - own) and the term, the artifact its weight and margin."""
    plain, contrasted = RecordingLogger(), RecordingLogger()
    Pipeline(pretrain_config(split, tmp_path / "plain", max_steps=2, checkpoint_every=0,
                             reconstruct_only_steps=2, contrast_weight=0.0), plain).run()
    Pipeline(pretrain_config(split, tmp_path / "contrast", max_steps=2, checkpoint_every=0, reconstruct_only_steps=2,
                             contrast_weight=2.0, contrast_margin=0.5), contrasted).run()
    assert "pretrain.reconstruct_carried" not in plain.scalars
    assert [step for step, _ in contrasted.scalars["pretrain.reconstruct_carried"]] == [1, 2]
    (_, term), = contrasted.scalars["pretrain.reconstruct_contrast_loss"][:1]
    (_, with_term), = contrasted.scalars["pretrain.reconstruct_loss"][:1]
    (_, without), = plain.scalars["pretrain.reconstruct_loss"][:1]
    assert term > 0 and with_term == pytest.approx(without + 2.0 * term, rel=1e-4)  # same first batch, same z
    training = artifacts.read_manifest(str(tmp_path / "contrast"))["training"]
    assert (training["contrast_weight"], training["contrast_margin"]) == (2.0, 0.5)


def test_a_writer_without_parameters_pretrains_the_reader_that_reads_what_it_wrote(split, tmp_path):
    """writer.name=keywords: the table is written once, as a run writes it, and pretraining trains the reader
    LoRA on it (nothing live, no writer tensors); a keywords run then starts from that artifact."""
    out = tmp_path / "pre"
    config = pretrain_config(split, out, max_steps=3, checkpoint_every=0)
    config.writer = {"name": "keywords"}
    pipeline = Pipeline(config)
    written = pipeline.model.doc_vectors.detach().clone()
    assert written.abs().sum() > 0  # the keywords were written into the table
    metrics = pipeline.run()
    assert not pipeline.model.live_writer and torch.equal(pipeline.model.doc_vectors.detach(), written)
    tensors = load_file(str(out / "pretrained" / "model.safetensors"))
    assert {key.split(".")[0] for key in tensors} == {"lora"} and "eval_F1" in metrics
    base = Pipeline(run_config(split, tmp_path / "base", None))
    lora = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.") and "lora_B" in k}
    before = dict(base.model.llm.named_parameters())
    assert any(not torch.equal(before[k], v) for k, v in lora.items())  # the reader LoRA was trained
    run = run_config(split, tmp_path / "run", str(out))
    run.writer = {"name": "keywords"}
    started = Pipeline(run, RecordingLogger())
    after = dict(started.model.llm.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in lora.items())


def run_config(split, out: Path, pretrained: str, **model) -> PQAConfig:
    return PQAConfig.from_dict({
        "seed": 1, "output_dir": str(out), "model": {**TINY, "pretrained": pretrained, **model}, "writer": ENCODER,
        "data": {"corpus": split["corpus"], "qa": split["qa"], "eval_qa": split["eval_qa"]},
        "write": {"epochs": 0}, "read": {"epochs": 1, "eval_every": 0}, "eval": {"max_new_tokens": 4}})


def test_a_run_starts_from_the_artifact_and_records_it(artifact, split, tmp_path):
    out, _, _ = artifact
    logger = RecordingLogger()
    pipeline = Pipeline(run_config(split, tmp_path / "run", str(out)), logger)
    recorded = logger.info["pretrained"]
    assert recorded["path"] == str(out / "pretrained") and recorded["tensors"]["writer"] > 0
    assert logger.info["writer"]["documents"] == pipeline.model.num_docs  # every row written by the encoder
    saved = load_file(str(out / "pretrained" / "model.safetensors"))
    memory = dict(pipeline.model.writer.state_dict())["memory"]
    assert torch.equal(memory, saved["writer.memory"])
    lora = {n: p for n, p in pipeline.model.llm.named_parameters() if "lora_" in n}
    assert all(torch.equal(lora[k[len("lora."):]], v) for k, v in saved.items() if k.startswith("lora."))
    # the artifact's content is part of the fingerprint: another artifact, another fingerprint
    untrained = Pipeline(run_config(split, tmp_path / "plain", None))
    assert untrained.fingerprint["digest"] != pipeline.fingerprint["digest"]
    result = pipeline.run()
    assert result["questions"] == len(load_qa(split["eval_qa"], load_corpus(split["corpus"])))


def test_documents_written_without_refinement_are_kept_for_a_later_run(artifact, split, tmp_path):
    """write.epochs=0 with no read phase: the encoder's z, written in one pass, are still the write phase's
    final checkpoint, the one the run record names, so a later run starts from them (init_from) and a
    resume loads them instead of writing again."""
    out, _, _ = artifact
    written = run_config(split, tmp_path / "written", str(out))
    written.phases = ["write", "eval"]
    logger = RecordingLogger()
    first = Pipeline(written, logger)
    first.run()
    final = tmp_path / "written" / "checkpoints" / "write" / "final"
    assert logger.info["write_checkpoint"] == str(final.resolve()) and (final / "MANIFEST.json").exists()
    assert json.loads((final / "state.json").read_text())["step"] == 0
    later = run_config(split, tmp_path / "later", None)
    # no artifact: its untrained encoder would write other z, and the checkpoint's must win
    later.init_from, later.phases = str(tmp_path / "written"), ["eval"]
    assert torch.equal(Pipeline(later, RecordingLogger()).model.doc_vectors, first.model.doc_vectors)
    stamp = lambda: ((final / "MANIFEST.json").stat().st_ino, (final / "MANIFEST.json").stat().st_mtime_ns)  # noqa: E731
    written_once = stamp()
    resumed = run_config(split, tmp_path / "ignored", str(out))
    resumed.phases, resumed.resume = ["write", "eval"], str(tmp_path / "written")
    resumed_logger = RecordingLogger()
    Pipeline(resumed, resumed_logger).run()
    assert stamp() == written_once
    assert resumed_logger.info["write_checkpoint"] == str(final.resolve())


def test_an_artifact_of_more_slots_starts_a_run_of_fewer_only_when_asked(artifact, split, tmp_path):
    """model.pretrained_slots=first: the m=2 artifact starts an m=1 run with its first memory slot, the rest
    of its tensors as saved, and the run records the cut; without it the same run is refused."""
    out, _, _ = artifact
    with pytest.raises(UsageError, match=r"num_memory_tokens=2.*pretrained_slots=first would"):
        Pipeline(run_config(split, tmp_path / "exact", str(out), num_memory_tokens=1))
    logger = RecordingLogger()
    pipeline = Pipeline(run_config(split, tmp_path / "first", str(out), num_memory_tokens=1,
                                   pretrained_slots="first"), logger)
    saved = load_file(str(out / "pretrained" / "model.safetensors"))
    writer = dict(pipeline.model.writer.state_dict())
    assert writer["memory"].shape[0] == 1 and torch.equal(writer["memory"], saved["writer.memory"][:1])
    assert torch.equal(writer["map.weight"], saved["writer.map.weight"])
    assert logger.info["pretrained"]["fewer_slots"] == {"from": 2, "to": 1, "tensors": ["writer.memory"]}
    assert pipeline.model.doc_vectors.shape[0] == pipeline.model.num_docs
    assert pipeline.run()["questions"] > 0


def test_fewer_slots_keep_a_projections_first_token_blocks(split, tmp_path):
    """A projection whose output layer makes m x d_model values (linear) keeps the rows of its first m tokens."""
    made = pretrain_config(split, tmp_path / "linear", max_steps=1)
    made.projection, made.writer = {"name": "linear"}, {"name": "keywords"}  # z: a MiniLM key, not soft tokens
    Pipeline(made).run()
    run = run_config(split, tmp_path / "run", str(tmp_path / "linear"), num_memory_tokens=1, pretrained_slots="first")
    run.projection, run.writer = {"name": "linear"}, {"name": "keywords"}
    logger = RecordingLogger()
    pipeline = Pipeline(run, logger)
    saved = load_file(str(tmp_path / "linear" / "pretrained" / "model.safetensors"))
    weight, bias = (pipeline.model.z_to_embedding.state_dict()[n] for n in ("proj.weight", "proj.bias"))
    d_model = pipeline.model.llm.get_input_embeddings().weight.shape[1]
    assert weight.shape[0] == d_model and saved["projection.proj.weight"].shape[0] == 2 * d_model
    assert torch.equal(weight, saved["projection.proj.weight"][:d_model])
    assert torch.equal(bias, saved["projection.proj.bias"][:d_model])
    assert sorted(logger.info["pretrained"]["fewer_slots"]["tensors"]) == ["projection.proj.bias",
                                                                           "projection.proj.weight"]


def test_a_reader_of_extractive_tokens_starts_a_run_of_more_only_under_any(artifact, split, tmp_path):
    """model.pretrained_slots=any: a sentences reader (its LoRA alone, nothing per soft token) made at m=2 reads
    m=3 with its LoRA as saved, and the run records it; exact and first refuse the same run, naming the way
    out; the encoder's artifact (a memory row per slot) is refused a larger m even under any."""
    made = pretrain_config(split, tmp_path / "sentences", max_steps=1)
    made.writer = {"name": "sentences"}
    Pipeline(made).run()

    def run(out, slots, writer):
        config = run_config(split, tmp_path / f"run-{slots}-{writer['name']}", str(out), num_memory_tokens=3,
                            pretrained_slots=slots)
        config.writer = writer
        return config

    for slots, hint in (("exact", "pretrained_slots=any lets m grow"), ("first", "m can only shrink")):
        with pytest.raises(UsageError, match=rf"num_memory_tokens=2, this run has num_memory_tokens=3.*{hint}"):
            Pipeline(run(tmp_path / "sentences", slots, {"name": "sentences"}))
    logger = RecordingLogger()
    pipeline = Pipeline(run(tmp_path / "sentences", "any", {"name": "sentences"}), logger)
    saved = load_file(str(tmp_path / "sentences" / "pretrained" / "model.safetensors"))
    lora = dict(pipeline.model.llm.named_parameters())
    assert saved and all(torch.equal(lora[k.partition(".")[2]], v) for k, v in saved.items() if k.startswith("lora."))
    assert logger.info["pretrained"]["more_slots"] == {"from": 2, "to": 3}
    assert pipeline.model.doc_vectors.shape[0] == pipeline.model.num_docs
    out, _, _ = artifact
    with pytest.raises(UsageError, match=r"'writer.memory' holds one part per soft token: m can only shrink"):
        Pipeline(run(out, "any", ENCODER))


def test_pretraining_goes_on_from_an_artifact_and_inherits_its_data(artifact, split, tmp_path):
    """A pretraining started from an artifact (here at fewer slots) on other passages: its held-out questions
    are checked against the artifact's questions only, and its own artifact names the first and holds the
    first one's data too, so a run evaluating on what the first read is refused the second."""
    out, _, _ = artifact
    corpus = load_corpus(split["corpus"])
    old = {text for text in (d.text for d in load_corpus(split["pre_corpus"]))}
    new_docs = [{"doc_id": d.doc_id, "title": d.title, "text": d.text} for d in corpus if d.text not in old]
    new_corpus = _jsonl(tmp_path / "new_corpus.jsonl", new_docs)
    config = pretrain_config(split, tmp_path / "more", max_steps=1)
    config.data.corpus, config.data.qa, config.data.eval_qa = new_corpus, split["qa"], split["eval_qa"]
    config.model.pretrained, config.model.num_memory_tokens, config.model.pretrained_slots = str(out), 1, "first"
    logger = RecordingLogger()
    Pipeline(config, logger).run()
    manifest = artifacts.read_manifest(str(tmp_path / "more"))
    assert manifest["started_from"]["path"] == str(out / "pretrained")
    assert manifest["started_from"]["fewer_slots"]["to"] == 1 and manifest["shape"]["num_memory_tokens"] == 1
    first = json.loads((out / "pretrained" / "contents.json").read_text())
    second = json.loads((tmp_path / "more" / "pretrained" / "contents.json").read_text())
    assert set(first["passages"]) < set(second["passages"]) and set(first["questions"]) < set(second["questions"])
    run = run_config(split, tmp_path / "run", str(tmp_path / "more"), num_memory_tokens=1)
    run.data.eval_qa = split["pre_eval"]  # about the passages only the first artifact read
    with pytest.raises(UsageError, match="overlaps this run's evaluation"):
        Pipeline(run)
    # going on with the first one's own data: its held-out questions share its passages, as they did for it
    again = pretrain_config(split, tmp_path / "again", max_steps=1)
    again.model.pretrained = str(out)
    Pipeline(again)
    again.data.eval_qa = split["pre_qa"]  # ... but its training questions are no held-out set
    with pytest.raises(UsageError, match=r"overlaps this run's evaluation \(104 of 104 questions"):
        Pipeline(again)


def test_a_trained_text_reader_is_the_distillation_teacher(artifact, split, tmp_path):
    """kl_distill's teacher_adapter: a text-reader artifact merged into its own copy of the LLM gives the logits
    of that reader (not of the LLM with its adapter off), leaves the run's own LoRA alone, is recorded and
    counts in the fingerprint; a pqa reader, or one trained on the run's evaluation questions, is refused."""
    from pqa_core.modeling.teacher import check_teacher, load_teacher
    from pqa_core.training.read_phase import ReadPhaseTrainer

    text = tmp_path / "text"
    Pipeline(pretrain_config(split, text, reader="text", max_steps=2, checkpoint_every=0, lr_lora=1e-2)).run()

    def config(out, teacher):
        run = run_config(split, out, None)
        run.generation_loss = {"name": "kl_distill", "alpha": 1.0, "teacher_adapter": teacher}
        return run

    logger = RecordingLogger()
    taught = Pipeline(config(tmp_path / "taught", str(text)), logger)
    plain = Pipeline(config(tmp_path / "plain", ""))
    info = logger.info["teacher"]
    assert info["kind"] == "artifact" and info["path"] == str(text / "pretrained")
    assert taught.fingerprint["values"]["generation_loss.teacher_adapter.content"] == info["sha256"]
    assert taught.fingerprint["digest"] != plain.fingerprint["digest"] and plain.teacher_llm is None
    teacher = taught.teacher_llm
    assert not any(p.requires_grad for p in teacher.parameters())
    own = {id(p) for p in taught.model.llm.parameters()}
    assert not any(id(p) in own for p in teacher.parameters())  # a copy: the run's LLM is not the teacher
    assert [n for n, _ in taught.model.llm.named_parameters()] == [n for n, _ in plain.model.llm.named_parameters()]
    batch = taught.read_dataset.collate([taught.read_dataset[i] for i in range(4)])
    trainer = lambda p: ReadPhaseTrainer(p.model, p.config.read, retrieval_loss=p.retrieval_loss,  # noqa: E731
                                         generation_loss=p.generation_loss, teacher_llm=p.teacher_llm)
    from_teacher, adapter_off = trainer(taught).teacher_logits(batch), trainer(plain).teacher_logits(batch)
    assert (from_teacher - adapter_off).abs().max() > 1e-3
    # the same text reader loaded as a control's own reader, adapter on, reads the passage alike
    control = PQAConfig.from_dict({**run_config(split, tmp_path / "control", str(text)).to_dict(),
                                   "phases": ["control_read", "control"], "control": {"name": "oracle"}})
    reading = Pipeline(control)
    passage = lambda model, llm=None: model.continuation_logits(  # noqa: E731
        None, batch["teacher_ids"], batch["teacher_mask"], batch["answer_ids"], batch["answer_mask"], llm=llm)[0]
    with torch.no_grad():
        assert torch.allclose(from_teacher, passage(reading.model), atol=1e-4)
    reading.run()  # that control, trained on: its checkpoint's LoRA adapter folder is a teacher too
    with torch.no_grad():
        checkpoint = tmp_path / "control" / "checkpoints" / "control_read" / "final"
        assert check_teacher(str(checkpoint), "tiny")["kind"] == "checkpoint"
        adapter = load_teacher(str(checkpoint), "tiny")
        assert torch.allclose(passage(reading.model, adapter), passage(reading.model), atol=1e-4)
        assert (passage(reading.model, adapter) - from_teacher).abs().max() > 1e-3
    own_training = load_qa(split["qa"], load_corpus(split["corpus"]))
    with pytest.raises(UsageError, match="trained on 16 of this run's evaluation questions"):
        check_teacher(str(checkpoint), "tiny", own_training)
    with pytest.raises(UsageError, match="trained on LLM 'tiny'"):
        check_teacher(str(checkpoint), "smollm2-135m")
    assert taught.run()["questions"] == 16  # a read phase distils from it
    with pytest.raises(UsageError, match="the checkpoint of a 'pqa' reader"):  # pqa's own reader is no teacher
        check_teacher(str(tmp_path / "taught" / "checkpoints" / "read" / "final"), "tiny")
    # refused, in one line, before the run exists
    proc = pqa(*_run_args(split, tmp_path / "run", "generation_loss.name=kl_distill",
                          f"generation_loss.teacher_adapter={artifact[0]}"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "'pqa' reader" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()
    trained_on = load_qa(split["pre_qa"], load_corpus(split["pre_corpus"]))
    with pytest.raises(UsageError, match="trained on 104 of this run's evaluation questions"):
        check_teacher(str(text), "tiny", trained_on)


def pqa(*args):
    return subprocess.run([sys.executable, "-m", "pqa_experiments.cli.main", *args], capture_output=True, text=True,
                          timeout=600, cwd=str(REPO), env={**__import__("os").environ, "PQA_PROGRESS": "0"})


def _run_args(split, out, *extra):
    return ["run", "pipeline", "--no-db", "with", "model.llm=tiny", "model.num_memory_tokens=2", "model.lora.r=4",
            "writer.name=encoder", "writer.layers=1", f"data.corpus={split['corpus']}", f"data.qa={split['qa']}",
            f"data.eval_qa={split['eval_qa']}", f"output_dir={out}", *extra]


@pytest.mark.parametrize("change, named", [("model.num_memory_tokens=3", "num_memory_tokens"),
                                           ("model.num_memory_tokens=3 model.pretrained_slots=first", "only shrink"),
                                           ("model.num_memory_tokens=3 model.pretrained_slots=any",
                                            "'writer.memory' holds one part per soft token"),
                                           ("writer.layers=2", "writer"), ("model.lora.r=2", "lora")])
def test_a_mismatched_artifact_is_refused_before_the_run_exists(artifact, split, tmp_path, change, named):
    out, _, _ = artifact
    proc = pqa(*_run_args(split, tmp_path / "run", f"model.pretrained={out}", *change.split()))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.pretrained" in lines[0] and named in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_control_needs_a_reader_of_its_own_input(artifact, split, tmp_path):
    out, _, _ = artifact
    proc = pqa("run", "control", "--no-db", "with", "model.llm=tiny", "model.lora.r=4", "control.name=closed_book",
               f"data.corpus={split['corpus']}", f"data.qa={split['qa']}", f"data.eval_qa={split['eval_qa']}",
               f"model.pretrained={out}", f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "'closed_book'" in proc.stderr and "pretrain.reader" in proc.stderr, proc.stderr


def test_pretraining_data_that_overlaps_the_evaluation_is_refused(artifact, split, tmp_path):
    out, _, _ = artifact
    # questions held out of pretraining, about passages it read: the passages overlap
    proc = pqa(*_run_args(split, tmp_path / "run", f"model.pretrained={out}", f"data.eval_qa={split['pre_eval']}"))
    held_out = load_qa(split["pre_eval"], load_corpus(split["pre_corpus"]))
    passages = len({row for q in held_out for row in q.gold_rows})
    assert proc.returncode == 2, proc.stderr
    assert (f"overlaps this run's evaluation (0 of {len(held_out)} questions, {passages} of their passages"
            in proc.stderr), proc.stderr
    # the pretraining questions themselves
    trained = len(load_qa(split["pre_qa"], load_corpus(split["pre_corpus"])))
    proc = pqa(*_run_args(split, tmp_path / "run", f"model.pretrained={out}", f"data.eval_qa={split['pre_qa']}"))
    assert proc.returncode == 2 and f"({trained} of {trained} questions" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_encoder_writer_trains_and_writes_a_batch_in_one_pass():
    from pqa_core.components import plugins
    from pqa_core.modeling.llm import load_llm

    llm, tokenizer = load_llm("tiny")
    context = {"llm": llm, "d_model": 64, "num_tokens": 3, "embedding_std": 0.02, "tokenizer": tokenizer,
               "pad_token_id": tokenizer.pad_token_id, "lora_target_modules": ["q_proj", "v_proj"]}
    writer = plugins.build("writer", "encoder", {"layers": 2, "batch_size": 16, "anchor": "none"}, context)
    texts = [f"Passage {i} says the tower is {i * 7} metres tall." for i in range(10)]
    tokens = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = writer(tokens[:4])
    assert out.shape == (4, 3, 64)
    out.pow(2).sum().backward()
    named = dict(writer.named_parameters())
    assert any(k.startswith("adapters.") and "lora_B" in k for k in named)
    for name, param in named.items():  # the LoRA (B; A sees zero through B=0 at the start), slots and map
        if "lora_A" not in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in llm.parameters())  # the LLM's own weights get nothing: a frozen copy
    calls = []
    writer.register_forward_hook(lambda *_: calls.append(1))
    written = writer.write_documents(texts, tokens)
    assert written.shape == (10, 3, 64) and len(calls) == 1  # N documents, one batched forward pass
    assert writer.last_write["documents"] == 10 and writer.last_write["documents_per_second"] > 0
    # a document is written the same alone or in a batch (padding is masked)
    alone = writer.write_documents(texts[:1], tokens[:1])
    assert torch.allclose(alone[0], written[0], atol=1e-4)


def test_the_encoder_writes_in_the_precision_it_is_given_and_an_artifact_fits_any():
    """writer.precision: bf16 computes the layers in bfloat16 (about 1.8x the documents per second on a CPU
    with native bfloat16) and writes nearly what float32 does; fp32 holds inside a bfloat16 autocast; the
    default follows the model's. Precision is no part of an artifact's shape."""
    from pqa_core.components import plugins
    from pqa_core.modeling.llm import load_llm
    from pqa_core.storage.pretrained import saved_shape, shape_of

    llm, tokenizer = load_llm("tiny")
    context = {"llm": llm, "d_model": 64, "num_tokens": 3, "embedding_std": 0.02, "tokenizer": tokenizer,
               "pad_token_id": tokenizer.pad_token_id, "lora_target_modules": ["q_proj", "v_proj"]}
    texts = [f"Passage {i} says the tower is {i * 7} metres tall." for i in range(6)]
    tokens = tokenizer(texts, add_special_tokens=False)["input_ids"]
    written, seen = {}, {}
    for precision in ("model", "bf16", "fp32"):
        torch.manual_seed(0)
        writer = plugins.build("writer", "encoder", {"layers": 2, "anchor": "none", "precision": precision}, context)
        dtypes = seen[precision] = set()
        writer.decoder.layers[0].mlp.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
        written[precision] = writer.write_documents(texts, tokens)
        if precision == "fp32":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                writer.write_documents(texts, tokens)
    assert seen == {"model": {torch.float32}, "bf16": {torch.bfloat16}, "fp32": {torch.float32}}
    assert written["bf16"].dtype == torch.float32
    difference = (written["bf16"] - written["model"]).norm() / written["model"].norm()
    assert 0 < difference < 0.05, difference
    with pytest.raises(UsageError, match=r"parameter 'precision' must be Literal\['model', 'bf16', 'fp32'\], got 'half'"):
        plugins.build("writer", "encoder", {"precision": "half"}, context)
    fp32 = PQAConfig.from_dict({"model": {"llm": "tiny"}, "writer": {"name": "encoder"}})
    bf16 = PQAConfig.from_dict({"model": {"llm": "tiny"}, "writer": {"name": "encoder", "precision": "bf16"}})
    assert shape_of(bf16, 64) == shape_of(fp32, 64) == saved_shape({"shape": shape_of(bf16, 64)})


@pytest.mark.parametrize("anchor", ["keywords", "sentences"])
def test_the_anchored_encoder_starts_as_its_anchor_writer_and_learns_what_it_adds(anchor):
    """anchor=keywords (the default) or sentences: before training the soft tokens are exactly that writer's
    (idf over the corpus the run prepares it with, alone or in a batch); the map gets gradient first."""
    from pqa_core.components import plugins
    from pqa_core.modeling.llm import load_llm

    llm, tokenizer = load_llm("tiny")
    context = {"llm": llm, "d_model": 64, "num_tokens": 12, "embedding_std": 0.02, "tokenizer": tokenizer,
               "pad_token_id": tokenizer.pad_token_id, "lora_target_modules": ["q_proj", "v_proj"]}
    encoder = plugins.build("writer", "encoder", {"layers": 2, "anchor": anchor}, context)
    writer = plugins.build("writer", anchor, {}, context)
    texts = [f"Passage {i} is short. It says the {w} tower of Berlin is {i * 7} metres tall. Nothing else."
             for i, w in enumerate(["red", "old", "new", "tall", "blue", "grey"])]
    tokens = tokenizer(texts, add_special_tokens=False)["input_ids"]
    encoder.prepare(texts, tokens)
    writer.prepare(texts, tokens)
    started = encoder.write_documents(texts, tokens)
    assert torch.allclose(started, writer.write_documents(texts, tokens))
    assert started.abs().sum() > 0 and not torch.allclose(started[0], started[1])  # each passage its own words
    assert torch.allclose(encoder.write_documents(texts[2:3], tokens[2:3])[0], started[2])  # the corpus's idf
    encoder(tokens[:2]).pow(2).sum().backward()
    assert encoder.map.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="anchor"):
        plugins.build("writer", "encoder", {"anchor": anchor}, {**context, "tokenizer": None})


def config_in_readme(readme: str) -> PQAConfig:
    """The run a shipped artifact's README says to start from it (its ``Start a run from it:`` settings, read
    as ``pqa run ... with`` reads them)."""
    from pqa_experiments.tracking.engine import parse_updates

    line = readme.split("Start a run from it: `")[1].split("`")[0]
    updates, named_configs = parse_updates(shlex.split(line))
    assert not named_configs, f"the README's settings hold a bare word: {named_configs}"
    return PQAConfig.from_dict(updates)


def test_shipped_artifacts_verify_and_are_disjoint_from_the_sample():
    from pqa_core.modeling.llm import llm_identity

    shipped = sorted(artifacts.SHIPPED_DIR.rglob("MANIFEST.json"))
    if not shipped:
        pytest.skip("no artifact shipped in this checkout")
    corpus = load_corpus(sample_data_path("corpus.jsonl"))
    questions = load_qa(sample_data_path("qa_eval.jsonl"), corpus)
    for manifest_file in shipped:
        folder = manifest_file.parent
        assert (folder / "README.md").exists() and "CC BY-SA 4.0" in (folder / "README.md").read_text()
        manifest = artifacts.read_manifest(str(folder))  # every file's sha256 as listed
        assert manifest["llm"]["name"] == "smollm2-135m"
        assert folder.name == manifest["reader"] or folder.name.startswith(manifest["reader"] + "-")  # a variant
        config = PQAConfig.from_dict({"model": {"pretrained": f"shipped:{folder.parent.name}/{folder.name}"}})
        artifacts.check_disjoint(config, manifest, questions, lambda q: [corpus[r].text for r in q.gold_rows])
        if folder.name != manifest["reader"]:  # a variant: the run its README gives is one it fits
            advertised = config_in_readme((folder / "README.md").read_text())
            assert artifacts.artifact_path(advertised) == folder
            artifacts.check_fits_run(advertised, manifest, llm_identity(advertised.model.llm), 576)
    # and they fit the runs `pqa demo` makes (its named config; the closed-book control its own reader)
    from pqa_experiments.tracking.experiments import NAMED_CONFIGS

    demo = NAMED_CONFIGS["demo"]
    runs = {"pqa": demo, "closed_book": {**demo, **NAMED_CONFIGS["train_reader"], "control": {"name": "closed_book"}}}
    for reader, values in runs.items():
        config = PQAConfig.from_dict(values)
        path = artifacts.artifact_path(config)  # model.pretrained=auto: the one of its reader that fits it
        assert path is not None and path.parent == artifacts.SHIPPED_DIR / config.model.llm
        manifest = artifacts.read_manifest(str(path))
        assert manifest["reader"] == reader
        artifacts.check_fits_run(config, manifest, llm_identity(config.model.llm), 576)


def test_a_shipped_variant_goes_beside_the_default_artifact_and_a_run_names_it(artifact, tmp_path, monkeypatch):
    """``bench/pretrain.py --ship --ship-variant NAME`` ships ``<reader>-NAME`` beside the artifact
    ``model.pretrained=auto`` takes, leaving that one as it was; its README says how to start a run from it."""
    monkeypatch.syspath_prepend(str(REPO))
    from bench import pretrain as script

    out, _, _ = artifact
    shipped = tmp_path / "pretrained"
    monkeypatch.setattr(script, "SHIPPED", shipped)
    monkeypatch.setattr(artifacts, "SHIPPED_DIR", shipped)
    data = {"about": {"articles": ["A", "B"], "passages": 28, "train_questions": 104, "held_out_questions": 8}}
    default = script.ship("tiny", "pqa", out / "pretrained", data, ["pretrain"], 1.0)
    before = {f.name: f.read_bytes() for f in default.iterdir()}
    variant = script.ship("tiny", "pqa", out / "pretrained", data, ["pretrain", "--m", "2"], 1.0, "encoder-m2")
    assert variant == shipped / "tiny" / "pqa-encoder-m2" and default == shipped / "tiny" / "pqa"
    assert {f.name: f.read_bytes() for f in default.iterdir()} == before  # not replaced
    readme = (variant / "README.md").read_text()
    assert "model.pretrained=auto" not in readme and "model.pretrained=auto" in (default / "README.md").read_text()
    # the settings its README gives start a run it fits (every one its shape differs from the defaults in)
    line = readme.split("Start a run from it: `")[1].split("`")[0]
    assert "model.pretrained=shipped:tiny/pqa-encoder-m2" in line and "writer.layers=1" in line
    config = config_in_readme(readme)
    manifest = artifacts.read_manifest(str(variant))
    assert artifacts.artifact_path(config) == variant
    artifacts.check_fits_run(config, manifest, manifest["llm"], manifest["shape"]["d_model"])
    config.writer["layers"] = 2  # and the check does look at them
    with pytest.raises(UsageError, match="made for writer="):
        artifacts.check_fits_run(config, manifest, manifest["llm"], manifest["shape"]["d_model"])
    with pytest.raises(SystemExit, match="--ship-variant"):
        script.shipped_name("pqa", "../elsewhere")


def test_auto_takes_the_shipped_artifact_of_the_run_s_reader_that_fits_its_shape(tmp_path, monkeypatch):
    """``model.pretrained=auto`` looks among the artifacts shipped for the LLM: the reader's own when it fits,
    else the one variant that does (``pqa demo`` names a shape, not a folder); two that fit are refused."""
    monkeypatch.setattr(artifacts, "SHIPPED_DIR", tmp_path)

    def run(m=2, writer="encoder", **more):
        return PQAConfig.from_dict({"model": {**TINY, "num_memory_tokens": m, "pretrained": "auto"},
                                    "writer": {**ENCODER, "name": writer} if writer == "encoder" else {"name": writer},
                                    **more})

    def ship(name, reader, config):
        folder = tmp_path / "tiny" / name
        folder.mkdir(parents=True)
        (folder / "MANIFEST.json").write_text(json.dumps({"reader": reader, "llm": {"name": "tiny"},
                                                             "shape": artifacts.shape_of(config, 64)}))
        return folder

    assert artifacts.artifact_path(run()) is None  # nothing shipped for the LLM: the run starts untrained
    default = ship("pqa", "pqa", run())
    sentences = ship("pqa-sentences-m4", "pqa", run(4, "sentences"))
    closed_book = ship("closed_book", "closed_book", run())
    assert artifacts.artifact_path(run()) == default
    assert artifacts.artifact_path(run(4, "sentences")) == sentences
    assert artifacts.artifact_path(run(4, "sentences", phases=["control_read", "control"],
                                       control={"name": "closed_book"})) == closed_book
    assert artifacts.artifact_path(run(4, "keywords")) == default  # none fits: the reader's own, refused by name
    with pytest.raises(UsageError, match="made for num_memory_tokens=2, this run has num_memory_tokens=4"):
        artifacts.check_fits_run(run(4, "keywords"), json.loads((default / "MANIFEST.json").read_text()),
                                 {"name": "tiny"}, 64)
    # pretrained_slots=first lets a larger m fit too: the artifact made with the run's own m comes first
    larger = ship("pqa-sentences-m8", "pqa", run(8, "sentences"))
    assert artifacts.artifact_path(run(4, "sentences", model={**TINY, "num_memory_tokens": 4, "pretrained": "auto",
                                                              "pretrained_slots": "first"})) == sentences
    with pytest.raises(UsageError, match=r"2 shipped artifacts fit this run \(pqa-sentences-m4, pqa-sentences-m8\)"):
        artifacts.artifact_path(run(3, "sentences", model={**TINY, "num_memory_tokens": 3, "pretrained": "auto",
                                                           "pretrained_slots": "first"}))
    shutil.rmtree(larger)
    ship("pqa-sentences-m4-again", "pqa", run(4, "sentences"))
    with pytest.raises(UsageError, match=r"2 shipped artifacts fit this run \(pqa-sentences-m4, "
                                         r"pqa-sentences-m4-again\); name one"):
        artifacts.artifact_path(run(4, "sentences"))
    assert artifacts.artifact_path(run()) == default
    (default / "MANIFEST.json").write_text("{torn")  # a broken shipped artifact is named, never skipped
    with pytest.raises(CheckpointError, match=r"pqa/MANIFEST.json: a shipped artifact's manifest cannot be read"):
        artifacts.artifact_path(run())


def test_an_artifact_made_before_a_parameter_existed_loads_with_what_it_was_made_with():
    """The encoder's ``anchor`` came after the first artifacts: one whose manifest lacks it was made
    unanchored, so it fits writer.anchor=none and is refused, naming the writer, under the default."""
    from pqa_core.storage.pretrained import check_fits_run, saved_shape

    shape = {"d_model": 64, "num_memory_tokens": 2, "lora": None,
             "writer": {"name": "encoder", "layers": 1, "lora_r": 8, "lora_alpha": 16.0, "max_tokens": 256,
                        "batch_size": 4}, "projection": None}
    manifest = {"reader": "pqa", "llm": {"name": "tiny"}, "shape": shape}
    assert saved_shape(manifest)["writer"] == {"anchor": "none", "layers": 1, "lora_alpha": 16.0, "lora_r": 8,
                                               "max_tokens": 256, "name": "encoder"}
    config = PQAConfig.from_dict({"model": {"llm": "tiny", "num_memory_tokens": 2, "lora": {"enabled": False}},
                                  "writer": {"name": "encoder", "layers": 1, "anchor": "none"}})
    fits = {**shape, "projection": artifacts.shape_of(config, 64)["projection"]}
    check_fits_run(config, {**manifest, "shape": fits}, {"name": "tiny"}, 64)
    config.writer["anchor"] = "keywords"
    with pytest.raises(Exception, match="made for writer="):
        check_fits_run(config, {**manifest, "shape": fits}, {"name": "tiny"}, 64)
