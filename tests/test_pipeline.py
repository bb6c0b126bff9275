"""End to end on the tiny model and the shipped sample: write -> read -> eval, determinism,
resume after a crash, a third-party selector used by name, batched generation."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pqa_core.storage.checkpoints import config_signature, load_checkpoint, model_signature, save_checkpoint
from pqa_core.config import PQAConfig
from pqa_core.errors import CheckpointError, DataError, UsageError
from pqa_core.pipeline import Pipeline
from pqa_core.training.loop import RecordingLogger, param_groups


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(tmp_path, **overrides):
    config = {
        "seed": 3,
        "output_dir": str(tmp_path / "run"),
        "model": {"llm": "tiny", "doc_init": "random", "num_memory_tokens": 2, "lora": {"r": 4}},
        "query_encoder": {"name": "llm_mean"},
        "write": {"epochs": 4, "eval_every": 2, "eval_docs": 4, "lr_z": 0.1, "lr_projection": 1e-2},
        "read": {"epochs": 3, "lr_z": 1e-2, "lr_query_encoder": 1e-2, "lr_lora": 1e-3, "retrieval_weight": 1.0},
        "eval": {"max_new_tokens": 6},
    }
    for key, value in overrides.items():
        section, _, leaf = key.partition(".")
        if leaf:
            config.setdefault(section, {})[leaf] = value
        else:
            config[key] = value
    return PQAConfig.from_dict(config)


def epoch_series(logger, name):
    return [value for _, value in logger.scalars[name]]


def test_end_to_end_tiny_learns_and_reports(tmp_path):
    logger = RecordingLogger()
    result = Pipeline(tiny_config(tmp_path), logger).run()

    metrics = ("EM", "F1", "substring", "Recall@3")
    assert set(result) == {"questions"} | {f"{m}{end}" for m in metrics for end in ("", "_ci95_low", "_ci95_high")}
    assert result["questions"] == 108
    assert all(math.isfinite(result[m]) and 0 <= result[f"{m}_ci95_low"] <= result[m] <= result[f"{m}_ci95_high"]
               <= 100 for m in metrics)
    write_losses = epoch_series(logger, "write.epoch_loss")
    read_losses = epoch_series(logger, "read.epoch_total_loss")
    assert len(write_losses) == 4 and write_losses[-1] < write_losses[0]
    assert len(read_losses) == 3 and read_losses[-1] < read_losses[0]
    # greedy reconstruction is measured, not only teacher-forced accuracy
    assert "write.greedy_token_acc" in logger.scalars and "write.tf_token_acc" in logger.scalars
    assert result["Recall@3"] > logger.info["Recall@3_before_write"]
    assert "Recall@3_after_write" in logger.info
    # the eval questions are scored after every read epoch, step-wise
    assert [step for step, _ in logger.scalars["read.eval_F1"]] == [14, 28, 42]

    lines = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 108
    record = json.loads(lines[0])
    assert {"question", "answers", "prediction", "selected_ids", "gold_doc_ids", "scores", "em", "f1"} <= set(record)
    assert len(record["selected_ids"]) == 3
    assert (tmp_path / "run" / "checkpoints" / "read" / "final" / "MANIFEST.json").exists()


def short_config(tmp_path, name="run", **overrides):
    base = {"write.epochs": 2, "read.epochs": 1, "write.eval_docs": 2, "output_dir": str(tmp_path / name)}
    base.update(overrides)
    return tiny_config(tmp_path, **base)


def test_same_seed_gives_identical_metrics(tmp_path):
    first = Pipeline(short_config(tmp_path, "a"), RecordingLogger())
    second = Pipeline(short_config(tmp_path, "b"), RecordingLogger())
    assert first.run() == second.run()
    assert torch.equal(first.model.doc_vectors, second.model.doc_vectors)
    other_seed = Pipeline(short_config(tmp_path, "c", seed=4), RecordingLogger())
    other_seed.run()
    assert not torch.equal(first.model.doc_vectors, other_seed.model.doc_vectors)


class CrashAt(RecordingLogger):
    """Simulates a killed process: raises once the given phase reaches the given step."""

    def __init__(self, name, step):
        super().__init__()
        self.name, self.step = name, step

    def log_scalar(self, name, value, step):
        super().log_scalar(name, value, step)
        if name == self.name and step == self.step:
            raise KeyboardInterrupt("simulated crash")


@pytest.mark.parametrize("crash", [("write.loss", 7), ("read.total_loss", 9)])
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, crash):
    overrides = {"write.checkpoint_every": 3, "read.checkpoint_every": 4}
    uninterrupted = Pipeline(short_config(tmp_path, "ref", **overrides), RecordingLogger())
    reference = uninterrupted.run()

    crashed_config = short_config(tmp_path, "crashed", **overrides)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(crashed_config, CrashAt(*crash)).run()
    resumed_config = short_config(tmp_path, "ignored", resume=str(tmp_path / "crashed"), **overrides)
    logger = RecordingLogger()
    resumed = Pipeline(resumed_config, logger)
    assert resumed.run() == reference
    # the row-wise optimizer's per-row state came back too: every weight is bit-identical
    for (name, a), (_, b) in zip(resumed.model.named_parameters(), uninterrupted.model.named_parameters()):
        assert torch.equal(a, b), name
    phase = crash[0].split(".")[0]
    assert f"{phase}_resumed_from" in logger.info


def test_a_finished_phase_asked_for_more_epochs_goes_on_to_the_weights_of_a_longer_run(tmp_path):
    """read.epochs is a budget, not a recipe: a finished run resumed with more epochs trains only the ones
    added, from its final checkpoint, and ends bit-identical to a run that asked for them from the start.
    Asking a finished phase for fewer epochs, or for more of a phase that a later one already trained on,
    is one line, nothing trained."""
    longer = Pipeline(short_config(tmp_path, "longer", **{"read.epochs": 2}), RecordingLogger())
    reference = longer.run()
    Pipeline(short_config(tmp_path, "short"), RecordingLogger()).run()
    final = tmp_path / "short" / "checkpoints" / "read" / "final"
    more = {"read.epochs": 2, "read.checkpoint_every": 16}  # 14 steps an epoch
    crashed = CrashAt("read.total_loss", 17)  # killed while going on, past a step checkpoint
    with pytest.raises(KeyboardInterrupt):
        Pipeline(short_config(tmp_path, "ignored", resume=str(tmp_path / "short"), **more), crashed).run()
    assert crashed.info["read_resumed_from"] == str(final) and "write_resumed_from" not in crashed.info
    logger = RecordingLogger()
    grown = Pipeline(short_config(tmp_path, "ignored", resume=str(tmp_path / "short"), **more), logger)
    assert grown.run() == reference
    for (name, a), (_, b) in zip(grown.model.named_parameters(), longer.model.named_parameters()):
        assert torch.equal(a, b), name
    assert logger.info["read_resumed_from"] == str(final.parent / "step-0000016")
    assert "read.epoch_total_loss" not in crashed.scalars
    assert len(epoch_series(logger, "read.epoch_total_loss")) == 1  # the added epoch only
    assert json.loads((final / "state.json").read_text())["epoch"] == 2
    with pytest.raises(UsageError, match=r"the read phase already trained 2 epochs .* asks for 1 epochs \(read\.epochs\)"):
        Pipeline(short_config(tmp_path, "ignored", resume=str(tmp_path / "short")), RecordingLogger()).run()
    more_writing = short_config(tmp_path, "ignored", resume=str(tmp_path / "short"), **{"read.epochs": 2,
                                                                                         "write.epochs": 3})
    with pytest.raises(UsageError, match=r"write\.epochs continues the write phase \(2 of 3 epochs\), but the read "
                                         r"phase already trained on its result"):
        Pipeline(more_writing, RecordingLogger()).run()
    assert json.loads((final / "state.json").read_text())["epoch"] == 2


def test_a_phase_that_crashed_past_a_smaller_budget_is_refused_before_anything_runs(tmp_path):
    """A read phase killed inside its second epoch (14 steps an epoch) cannot be resumed as a 1-epoch run:
    its weights hold more than that, and a final checkpoint would say 1 epoch."""
    overrides = {"read.epochs": 2, "read.checkpoint_every": 16}
    with pytest.raises(KeyboardInterrupt):
        Pipeline(short_config(tmp_path, "crashed", **overrides), CrashAt("read.total_loss", 17)).run()
    step = tmp_path / "crashed" / "checkpoints" / "read" / "step-0000016"
    with pytest.raises(UsageError, match=r"the read phase already trained 1 epochs and 2 steps of the next "
                                         rf"\({step}\) and this run asks for 1 epochs \(read\.epochs\)"):
        Pipeline(short_config(tmp_path, "ignored", resume=str(tmp_path / "crashed")), RecordingLogger())
    assert not (step.parent / "final").exists()


def test_a_checkpoint_written_before_a_key_existed_resumes_while_the_key_keeps_its_default(tmp_path):
    """pqa adds config keys whose default is what it did before; a checkpoint written before the key existed
    holds no value for it. It resumes when the run leaves the key at its default, and is refused otherwise
    (one line naming the key), as is any key the checkpoint holds with another value."""
    from pqa_core.components.plugins import with_component_defaults
    from pqa_core.pipeline import check_output_dir, fingerprint_of

    run = tmp_path / "run"

    def config(writer=None, **model):
        writer = writer or {}
        # as a run's config holds it: the component's parameters filled with their defaults
        filled = with_component_defaults("writer", {"name": "encoder", **writer})
        return PQAConfig.from_dict({"model": {"llm": "tiny", **model}, "writer": filled, "resume": str(run)})

    current = fingerprint_of(config())
    added = ("model.gradient_checkpointing", "writer.precision")  # a config key, a component's parameter
    assert all(key in current["values"] for key in added)
    older = {k: v for k, v in current["values"].items() if k not in added}
    checkpoint = run / "checkpoints" / "write" / "final"
    checkpoint.mkdir(parents=True)
    (checkpoint / "MANIFEST.json").write_text(json.dumps(
        {"files": {}, "fingerprint": {"digest": "written-by-an-older-pqa", "values": older}}))
    assert check_output_dir(config(), current, run) == []
    on = config(gradient_checkpointing=True)
    with pytest.raises(CheckpointError, match=r"another configuration: model\.gradient_checkpointing=unset "
                                              r"\(now True\); resume"):
        check_output_dir(on, fingerprint_of(on), run)
    with pytest.raises(CheckpointError, match=r"another configuration: writer\.precision=unset \(now 'bf16'\); "):
        bf16 = config(writer={"precision": "bf16"})
        check_output_dir(bf16, fingerprint_of(bf16), run)
    other = config(num_memory_tokens=3)
    with pytest.raises(CheckpointError, match=r"another configuration: model\.num_memory_tokens=\d+ \(now 3\); "):
        check_output_dir(other, fingerprint_of(other), run)



def test_third_party_selector_is_used_by_name(tmp_path, fake_distribution):
    pipeline = Pipeline(short_config(tmp_path, selector={"name": "third_party"}), RecordingLogger())
    assert type(pipeline.model.selector).__name__ == "ThirdPartySelector"
    result = pipeline.run()
    assert "Recall@3" in result


def test_batched_generation_equals_one_at_a_time(tmp_path):
    pipeline = Pipeline(short_config(tmp_path), RecordingLogger())
    model, dataset = pipeline.model, pipeline.eval_dataset
    model.eval()
    batch = dataset.collate([dataset[i] for i in range(6)])
    docs = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [1, 3, 5], [2, 4, 6]])
    together = model.generate(batch["query_ids"], docs, batch["query_mask"], max_new_tokens=5)
    for i in range(6):
        single = dataset.collate([dataset[i]])
        alone = model.generate(single["query_ids"], docs[i:i + 1], single["query_mask"], max_new_tokens=5)
        assert together[i, :alone.shape[1]].tolist() == alone[0].tolist()


def test_out_of_range_gold_id_names_the_example(tmp_path):
    from pqa_core.training.read_phase import ReadPhaseTrainer
    from pqa_core.modeling.builder import build_losses

    pipeline = Pipeline(short_config(tmp_path), RecordingLogger())
    retrieval, generation = build_losses(pipeline.config)
    trainer = ReadPhaseTrainer(pipeline.model, pipeline.config.read, retrieval_loss=retrieval, generation_loss=generation)
    scores = torch.zeros(2, pipeline.model.num_docs)
    gold = torch.tensor([[1, -1], [5, pipeline.model.num_docs]])
    with pytest.raises(DataError, match="'q-second'"):
        trainer.compute_retrieval_loss(scores, gold, ["q-first", "q-second"])


def test_torn_corrupt_and_mismatched_checkpoints_are_refused(tmp_path):
    pipeline = Pipeline(short_config(tmp_path), RecordingLogger())
    model = pipeline.model
    path = save_checkpoint(tmp_path / "ck", model, step=1, epoch=0, config=pipeline.config_dict)
    load_checkpoint(path, model, config=pipeline.config_dict)  # a good one loads

    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(path, model)

    path = save_checkpoint(tmp_path / "ck2", model, step=1, epoch=0, config=pipeline.config_dict)
    (path / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        load_checkpoint(path, model)

    path = save_checkpoint(tmp_path / "ck3", model, step=1, epoch=0, config=pipeline.config_dict)
    other = dict(pipeline.config_dict, model=dict(pipeline.config_dict["model"], num_memory_tokens=4))
    with pytest.raises(CheckpointError, match="num_memory_tokens"):
        load_checkpoint(path, model, config=other)


@pytest.mark.parametrize("lora", [True, False])
def test_signature_known_before_the_model_is_built_is_the_built_models(tmp_path, lora):
    """The pre-flight check compares a checkpoint with the config's signature: it must be the model's."""
    pipeline = Pipeline(short_config(tmp_path, model={"llm": "tiny", "doc_init": "random", "num_memory_tokens": 2,
                                                      "lora": {"r": 4, "enabled": lora}}), RecordingLogger())
    expected = model_signature(pipeline.model, pipeline.config_dict)
    known = config_signature(pipeline.config_dict, len(pipeline.corpus))
    assert known.pop("d_z") in (None, expected.pop("d_z"))  # None: model.d_z=0, the projection sizes z
    assert known == expected
    assert expected["lora"] is lora and expected["lora_r"] == (4 if lora else None)


def test_optimizer_state_of_other_param_groups_is_refused_naming_the_file(tmp_path):
    pipeline = Pipeline(short_config(tmp_path), RecordingLogger())
    model = pipeline.model
    projection = list(model.z_to_embedding.parameters())

    def adamw(*groups):
        return torch.optim.AdamW(param_groups(groups))

    saved_with = adamw(("z", [model.doc_vectors], 0.1), ("projection", projection, 0.1))
    (model.doc_vectors.sum() + sum(p.sum() for p in projection)).backward()
    saved_with.step()  # now it holds exp_avg/exp_avg_sq shaped like each tensor
    path = save_checkpoint(tmp_path / "ck", model, saved_with, step=1, epoch=0, config=pipeline.config_dict)
    for other, detail in [
        (adamw(("z", [model.doc_vectors], 0.1)), "2 param groups saved, 1 here"),
        (adamw(("z", [model.doc_vectors], 0.1), ("lora", model.lora_parameters(), 0.1)),
         "param group 1 is 'projection' in the checkpoint, 'lora' here"),
        # torch itself would load this one and fail (or broadcast) at the next step
        (adamw(("z", [model.doc_vectors], 0.1), ("projection", projection[::-1], 0.1)),
         "of a tensor in param group 'projection' has shape"),
    ]:
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path, model, other, config=pipeline.config_dict)
        message = str(info.value)
        assert message.startswith(f"{path / 'optimizer.safetensors'}: optimizer state of another model"), message
        assert detail in message and "\n" not in message
    fits = adamw(("z", [model.doc_vectors], 0.1), ("projection", projection, 0.1))
    load_checkpoint(path, model, fits, config=pipeline.config_dict)
    assert torch.equal(fits.state_dict()["state"][0]["exp_avg"], saved_with.state_dict()["state"][0]["exp_avg"])


def test_pickle_in_checkpoint_is_never_executed(tmp_path):
    """A checkpoint whose weights file is a pickle with a payload: refused, payload not run."""
    import hashlib
    import pickle

    pipeline = Pipeline(short_config(tmp_path), RecordingLogger())
    path = save_checkpoint(tmp_path / "ck", pipeline.model, step=1, epoch=0, config=pipeline.config_dict)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = pickle.dumps({"doc_vectors": Payload()})
    (path / "model.safetensors").write_bytes(evil)
    manifest = json.loads((path / "MANIFEST.json").read_text())
    manifest["files"]["model.safetensors"] = {"sha256": hashlib.sha256(evil).hexdigest(), "bytes": len(evil)}
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_checkpoint(path, pipeline.model)
    assert not marker.exists()


def test_hybrid_projection_keys_retrieval_on_minilm_and_write_phase_leaves_it(tmp_path):
    """z = [384-float MiniLM key | free content]: the selector reads only the key, the write phase
    trains the content and the shared map but never moves the key (so retrieval is kept)."""
    from pqa_core.modeling.builder import build_model
    from pqa_core.data.loading import WritePhaseDataset, load_corpus, sample_data_path
    from pqa_core.config import WriteSettings
    from pqa_core.training.write_phase import WritePhaseTrainer, prepared_objective

    m, d_model = 2, 64  # the tiny LLM's hidden size
    config = tiny_config(tmp_path, model={"llm": "tiny", "doc_init": "minilm", "num_memory_tokens": m,
                                          "d_z": 0, "content_init": "zero", "lora": {"enabled": False}},
                         projection={"name": "hybrid", "key_in_prompt": True}, query_encoder={"name": "minilm"})
    corpus = load_corpus(sample_data_path("corpus.jsonl"))
    model = build_model(config, corpus, device=torch.device("cpu"))
    dataset = WritePhaseDataset(corpus, model.tokenizer, max_length=256)
    assert len(dataset) == 36  # no sample passage is longer than 256 tokens
    assert model.key_dims == 384 and model.doc_vectors.shape == (36, 384 + m * d_model)
    assert torch.count_nonzero(model.doc_vectors[:, 384:]) == 0
    assert torch.allclose(model.doc_vectors[:, :384].norm(dim=1), torch.ones(36), atol=1e-4)  # MiniLM, unit norm
    ids = model.query_encoder.tokenizer(["Who founded the city?"], return_tensors="pt")
    before = model.score_documents(ids["input_ids"], ids["attention_mask"]).detach()
    with torch.no_grad():  # content coordinates do not change what the selector sees
        model.doc_vectors[:, 384:] += 1.0
    assert torch.equal(model.score_documents(ids["input_ids"], ids["attention_mask"]).detach(), before)
    with torch.no_grad():
        model.doc_vectors[:, 384:] -= 1.0

    keys, content = model.doc_vectors[:, :384].detach().clone(), model.doc_vectors[:, 384:].detach().clone()
    mlp = [p.detach().clone() for p in model.z_to_embedding.parameters()]
    objective = prepared_objective("reconstruct", model, dataset.rows)
    trainer = WritePhaseTrainer(model, WriteSettings(lr_z=0.1, lr_projection=1e-2), objective)
    batch = dataset.collate([dataset[i] for i in range(4)])
    first = trainer.train_step(batch)["loss"]
    for _ in range(5):
        last = trainer.train_step(batch)["loss"]
    assert last < first
    assert torch.equal(model.doc_vectors[:, :384].detach(), keys)  # the key never moved
    assert not torch.equal(model.doc_vectors[:4, 384:].detach(), content[:4])  # the content learnt
    assert torch.equal(model.doc_vectors[4:, 384:].detach(), content[4:])  # only the documents trained on
    assert any(not torch.equal(p.detach(), q) for p, q in zip(model.z_to_embedding.parameters(), mlp))
    assert torch.equal(model.score_documents(ids["input_ids"], ids["attention_mask"]).detach(), before)


def test_read_lr_z_zero_leaves_z_as_written_while_the_reader_learns(tmp_path):
    """``read.lr_z=0``: no row of z moves in the read phase, not even the keys the retrieval loss pulls on,
    while the LoRA, the projection and the query side train."""
    config = tiny_config(tmp_path, phases=["write", "read"], **{"write.epochs": 1, "read.epochs": 1, "read.lr_z": 0.0})
    pipeline = Pipeline(config, RecordingLogger())
    pipeline.run_write()
    written = pipeline.model.doc_vectors.detach().clone()
    lora = [p.detach().clone() for p in pipeline.model.lora_parameters()]
    pipeline.run_read()
    assert torch.equal(pipeline.model.doc_vectors.detach(), written)
    assert any(not torch.equal(p.detach(), q) for p, q in zip(pipeline.model.lora_parameters(), lora))
    moving = Pipeline(tiny_config(tmp_path / "moving", phases=["write", "read"],
                                  **{"write.epochs": 1, "read.epochs": 1}), RecordingLogger())
    moving.run_write()
    before = moving.model.doc_vectors.detach().clone()
    moving.run_read()
    assert not torch.equal(moving.model.doc_vectors.detach(), before)  # the default moves them


def test_minilm_init_with_a_key_of_the_wrong_size_is_a_usage_error(tmp_path):
    from pqa_core.modeling.builder import build_model
    from pqa_core.data.loading import load_corpus, sample_data_path
    config = tiny_config(tmp_path, model={"llm": "tiny", "doc_init": "minilm", "num_memory_tokens": 2, "d_z": 128,
                                          "lora": {"enabled": False}}, projection={"name": "direct"})
    with pytest.raises(UsageError, match="needs a 384-float retrieval key; got model.d_z=128 with projection 'direct'"):
        build_model(config, load_corpus(sample_data_path("corpus.jsonl")), device=torch.device("cpu"))
    # model.d_z=0 with a projection that maps z (no free floats): a MiniLM-sized z, content_init=auto leaves it
    auto = tiny_config(tmp_path, model={"llm": "tiny", "doc_init": "minilm", "d_z": 0, "lora": {"enabled": False}},
                       projection={"name": "mlp2x_gelu"})
    model = build_model(auto, load_corpus(sample_data_path("corpus.jsonl")), device=torch.device("cpu"))
    assert model.doc_vectors.shape == (36, 384)
