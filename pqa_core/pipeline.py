"""One run: load data, build the model, then the configured phases (write -> read -> eval), or the
``control`` phase, which scores a baseline (``pqa_core.training.controls``) on the eval questions instead.

Every phase ends in an atomic checkpoint under ``output_dir/checkpoints/<phase>/final``. With
``resume`` set to an earlier run's output folder, finished phases are loaded instead of re-run
and an unfinished one continues from its latest step checkpoint. A run holds its output folder's
lock (``run_lock``) while it runs, so no second process writes the same checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from pqa_core.training import distributed
from pqa_core.storage import fingerprint
from pqa_core.components.plugins import components_of_run
from pqa_core.modeling.builder import build_component, build_losses, build_model
from pqa_core.storage.checkpoints import (MANIFEST, checkpoint_position, latest_checkpoint, load_checkpoint,
                                         resume_checkpoint)
from pqa_core.config import PHASES, TRAINED_PHASES, PQAConfig, check_choice
from pqa_core.data.loading import ReadPhaseDataset, WritePhaseDataset, load_corpus, load_qa, sample_data_path, split_passages
from pqa_core.errors import CheckpointError, UsageError
from pqa_core.evaluation.qa import evaluate_qa, evaluate_retrieval
from pqa_core.storage.fingerprint import CONFIG_KEY as FINGERPRINT_KEY
from pqa_core.storage.fingerprint import TRAINING_DATA
from pqa_core.interfaces import WriteContext, writer_trains
from pqa_core.modeling.llm import llm_identity, load_llm
from pqa_core.training.read_phase import ReadPhaseTrainer
from pqa_core.modeling.selection_index import build_index, describe
from pqa_core.storage.run_lock import output_folder_lock
from pqa_core.training.loop import EpochLoop, RunLogger, seed_everything
from pqa_core.training.write_phase import WritePhaseTrainer

log = logging.getLogger(__name__)


def resolve_data_path(spec: str) -> Path:
    """``sample:NAME`` -> the shipped sample file; anything else is a path."""
    if spec.startswith("sample:"):
        return sample_data_path(spec[len("sample:"):])
    return Path(spec).expanduser()


class Pipeline:
    """Holds the loaded data and model so phases can also be run one at a time (notebooks, tests)."""

    def __init__(self, config: PQAConfig, logger: Optional[RunLogger] = None, llm_and_tokenizer=None):
        config.validate()
        self.config = config
        self.logger = logger or RunLogger()
        self.group = distributed.current()  # several processes: every one builds the same model and data
        self.output_dir = Path(self.group.broadcast_object(str(config.resume or config.output_dir or "outputs/run")))
        self.fingerprint = fingerprint_of(config)
        # the folder is checked once, by the process that writes it
        forced = check_output_dir(config, self.fingerprint, self.output_dir) if self.group.is_main else []
        self.config_dict = {**config.to_dict(), FINGERPRINT_KEY: self.fingerprint}  # checkpoints record it
        self.logger.set_info("fingerprint", self.fingerprint["digest"])
        if forced:
            self.logger.set_info("resume_forced", forced)
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        self.corpus = load_corpus(resolve_data_path(config.data.corpus))
        self.train_qa = load_qa(resolve_data_path(config.data.qa), self.corpus)
        self.eval_qa = load_qa(resolve_data_path(config.data.eval_qa), self.corpus)
        data = config.data
        llm_and_tokenizer = llm_and_tokenizer or load_llm(config.model.llm)
        self.rows = split_passages(self.corpus, llm_and_tokenizer[1], data.max_doc_tokens)
        log.info("%s", self.rows.describe())
        self.logger.set_info("documents", {"passages": len(self.corpus), "rows": len(self.rows.documents),
                                           "split_passages": self.rows.split_passages,
                                           "max_doc_tokens": data.max_doc_tokens})
        # a memory-mapped table (model.doc_storage=mmap) lives in the output folder, one per process
        table_dir = self.output_dir / "tables" / f"rank-{self.group.rank}"
        if config.model.pretrained:  # before the model is built: one line, nothing written
            self.check_pretrained_disjoint()
        self.model = build_model(config, self.rows.documents, llm_and_tokenizer, table_dir=table_dir,
                                 row_tokens=self.rows.tokens, live_writer=self.pretrains_writer)
        self.model.row_ids = [[d.doc_id, d.part] for d in self.rows.documents]
        self.model.row_tokens = self.rows.tokens
        if getattr(self.model, "pretrained", None):  # the artifact the run started from
            self.logger.set_info("pretrained", self.model.pretrained)
        if getattr(self.model, "write_info", None):  # how fast the writer wrote the documents
            self.logger.set_info("writer", self.model.write_info)
        self.new_rows = list(range(len(self.rows.documents)))  # rows no init_from checkpoint filled
        self.tokenizer = self.model.tokenizer
        encoder_tokenizer = getattr(self.model.query_encoder, "tokenizer", None)
        retrieval_loss, generation_loss = build_losses(config)
        self.retrieval_loss, self.generation_loss = retrieval_loss, generation_loss
        self.teacher_llm = self.load_teacher()
        teacher = self.corpus if getattr(generation_loss, "needs_teacher", False) else None
        self.write_dataset = WritePhaseDataset(self.rows, self.tokenizer)
        read_kwargs = dict(encoder_tokenizer=encoder_tokenizer, max_query_length=data.max_query_tokens,
                           max_answer_length=data.max_answer_tokens, prompt=data.prompt, rows=self.rows)
        self.read_dataset = ReadPhaseDataset(self.train_qa, self.tokenizer, teacher_corpus=teacher, **read_kwargs)
        self.eval_dataset = ReadPhaseDataset(self.eval_qa, self.tokenizer, **read_kwargs)
        self.timings: Dict[str, float] = {}
        self.index = build_index(config.eval)  # searched at every evaluation; rebuilt when z changed
        if config.init_from:
            self.load_initial(Path(config.init_from))
        self.group.check_same(self.model.doc_vectors, "doc_vectors")

    @property
    def pretrains_writer(self) -> bool:
        """A pqa pretraining run: its writer, if it has parameters, writes each step's documents live rather
        than the table (``build_model`` and ``PretrainTrainer`` ask ``writer_trains``)."""
        return "pretrain" in self.config.phases and self.config.pretrain.reader == "pqa"

    def load_teacher(self):
        """The trained text reader the generation loss distils (``teacher_adapter``), recorded; None when the
        loss names none (a distilling loss then reads the LLM with its adapter off)."""
        from pqa_core.modeling.teacher import check_teacher, load_teacher, teacher_spec

        spec = teacher_spec(self.config)  # "" unless a phase of the run trains on the loss
        if not spec or not getattr(self.generation_loss, "needs_teacher", False):
            return None
        info = check_teacher(spec, self.config.model.llm, self.eval_qa)
        teacher = load_teacher(spec, self.config.model.llm, self.model.doc_vectors.device, info=info)
        self.logger.set_info("teacher", info)
        log.info("distillation teacher: the %s %s, merged into its own copy of %s", info["kind"], info["path"],
                 self.config.model.llm)
        return teacher

    def check_pretrained_disjoint(self) -> None:
        """``model.pretrained``'s pretraining data holds none of this run's evaluation questions or their passages."""
        from pqa_core.storage.pretrained import check_for_run

        check_for_run(self.config, self.corpus, self.eval_qa)

    def run_pretrain(self) -> Dict[str, float]:
        """Train the reusable parts (``pqa_core.training.pretrain``), then save them as an artifact in
        ``output_dir/pretrained`` (``pqa_core.storage.pretrained``) and score them on ``data.eval_qa``."""
        from pqa_core.training.controls import ControlReaderDataset, ControlReaderTrainer
        from pqa_core.training.pretrain import PretrainTrainer, read_settings, reconstruction_objective

        p, data = self.config.pretrain, self.config.data
        metrics: Dict[str, float] = {}
        finished = self._finished("pretrain", "steps", self.pretrain_steps(), PRETRAIN_BUDGET)
        if finished is not None:  # the artifact keeps the training's averages and time
            metrics, seconds = dict(finished.get("metrics") or {}), finished.get("seconds")
        else:
            root = self.checkpoint_root("pretrain")
            if p.reader == "pqa":
                trainer = PretrainTrainer(self.model, p, retrieval_loss=self.retrieval_loss,
                                          generation_loss=self.generation_loss,
                                          reconstruction=reconstruction_objective(self.write_context(), p),
                                          teacher_llm=self.teacher_llm)
                metrics = trainer.fit(self.read_dataset, seed=self.config.seed, checkpoint_root=root,
                                      config_dict=self.config_dict, logger=self.logger, phase="pretrain",
                                      max_steps=p.max_steps)
            else:
                dataset = ControlReaderDataset(self.control_of_pretrain(), self.train_qa, self.tokenizer, top_k=p.top_k,
                                               prompt=data.prompt, max_answer_tokens=data.max_answer_tokens)
                trainer = ControlReaderTrainer(self.model, read_settings(p))
                metrics = trainer.fit(dataset, seed=self.config.seed, checkpoint_root=root,
                                      config_dict=self.config_dict, logger=self.logger, phase="pretrain",
                                      max_steps=p.max_steps)
            seconds = trainer.loop.seconds()
        if self.group.is_main:  # scored first, so that the artifact records its scores
            metrics = {**metrics, **self.score_pretrained()}
            path = self.save_pretrained(metrics, seconds)
            self.logger.set_info("pretrained_artifact", str(path.resolve()))
            self.logger.add_artifact(str(path / "MANIFEST.json"), "pretrained_MANIFEST.json")
        return metrics

    def save_pretrained(self, metrics: Dict[str, float], seconds: Optional[float]) -> Path:
        """``seconds``: the pretraining's time summed over its resumes (None if a checkpoint older than that
        record was resumed); scoring is not counted."""
        from pqa_core.components.plugins import with_component_defaults
        from pqa_core.storage.pretrained import data_summary, save_pretrained

        data = self.config.data
        summary = data_summary(resolve_data_path(data.corpus), resolve_data_path(data.qa), len(self.corpus),
                               len(self.train_qa))
        p = self.config.pretrain
        steps = self.pretrain_steps()
        training = {"epochs": p.epochs, "steps": steps, "batch_size": p.batch_size, "lr_lora": p.lr_lora,
                    "lr_writer": p.lr_writer, "lr_projection": p.lr_projection, "top_k": p.top_k,
                    "reconstruct_weight": p.reconstruct_weight, "reconstruct_tokens": p.reconstruct_tokens,
                    "reconstruct_only_steps": p.reconstruct_only_steps, "contrast_weight": p.contrast_weight,
                    "contrast_margin": p.contrast_margin, "seed": self.config.seed,
                    "generation_loss": with_component_defaults("generation_loss", self.config.generation_loss),
                    "retrieval_loss": with_component_defaults("retrieval_loss", self.config.retrieval_loss),
                    "seconds": None if seconds is None else round(seconds, 3), "metrics": metrics}
        return save_pretrained(self.output_dir / "pretrained", self.model, self.config,
                               llm_identity=llm_identity(self.config.model.llm), data=summary,
                               passages=[d.text for d in self.corpus], questions=[q.question for q in self.train_qa],
                               training=training, fingerprint=self.fingerprint["digest"],
                               started_from=getattr(self.model, "pretrained", None))

    def score_pretrained(self) -> Dict[str, float]:
        """The pretrained reader on ``data.eval_qa`` (held-out questions of the pretraining corpus); its
        answers go to ``eval.predictions_file`` (a run artifact), so two artifacts compare question by question."""
        e = self.config.eval
        path = self.output_dir / e.predictions_file
        if self.config.pretrain.reader == "pqa":
            self.model.live_writer = writer_trains(self.model.writer)
            scores = self.evaluate_eval_questions(str(path))
        else:
            from pqa_core.training.controls import evaluate_control

            scores = evaluate_control(
                self.model, self.control_of_pretrain(), self.eval_qa, top_k=self.config.pretrain.top_k,
                batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, prompt=self.config.data.prompt,
                seed=self.config.seed, predictions_path=str(path))
        self.logger.add_artifact(str(path), "predictions.jsonl")
        return {f"eval_{k}": v for k, v in scores.items()}

    def load_initial(self, source: Path) -> None:
        """Load the model (not the optimizer) from a checkpoint folder or an earlier run's output folder."""
        checkpoint = initial_checkpoint(source)
        state = load_checkpoint(checkpoint, self.model, config=self.config_dict, restore_rng=False, grow=True)
        loaded = set(state["loaded_rows"])
        self.new_rows = [r for r in range(self.model.num_docs) if r not in loaded]
        self.logger.set_info("initialised_from", str(checkpoint.resolve()))
        if self.new_rows:
            self.logger.set_info("documents_added", len(self.new_rows))
        log.info("model initialised from %s (%d documents from it, %d new)", checkpoint, len(loaded),
                 len(self.new_rows))

    def checkpoint_root(self, phase: str) -> Path:
        return self.output_dir / "checkpoints" / phase

    def pretrain_steps(self) -> int:
        return pretrain_steps(self.config, len(self.train_qa))

    def _finished(self, phase: str, unit: str, asked: int, budget: str) -> Optional[Dict[str, Any]]:
        """``phase``'s final checkpoint, loaded (its verified state.json: step, the training's last
        metrics) when it ends where this run's budget does (``asked`` steps or epochs, ``unit``; ``budget``
        names the config key), else None: the phase runs, going on from its checkpoints (``check_budget``)."""
        if not check_budget(self.output_dir, self.config.phases, phase, unit, asked, budget):
            return None
        final = self.checkpoint_root(phase) / "final"
        state = load_checkpoint(final, self.model, config=self.config_dict, restore_rng=True)
        log.info("%s phase already finished in %s: loaded it", phase, final)
        return state

    def write_context(self) -> WriteContext:
        """What the write objective prepares from: the rows, the training questions and where they live."""
        data = self.config.data
        return WriteContext(
            model=self.model, tokenizer=self.tokenizer, documents=self.rows.documents, doc_tokens=self.rows.tokens,
            questions=self.train_qa,
            question_rows=[[r for p in q.gold_rows for r in self.rows.rows_of_passage[p]] for q in self.train_qa],
            prompt=data.prompt, max_query_tokens=data.max_query_tokens, max_answer_tokens=data.max_answer_tokens,
            seed=self.config.seed, cache_dir=str(self.output_dir / "cache"))

    def run_write(self) -> Dict[str, float]:
        w = self.config.write
        if self._finished("write", "epochs", w.epochs, "write.epochs") is not None:
            return {}
        if w.epochs == 0:  # z stays as the writer wrote it, and is still the phase's final checkpoint: what a
            # later run's init_from or this run's resume starts from, and what the record's write_checkpoint names
            log.info("write phase: write.epochs=0, z as the writer wrote it")
            # the checkpoint any trained phase ends with, written by the same loop (main process only)
            loop = EpochLoop(self.model, None, phase="write", checkpoint_root=self.checkpoint_root("write"),
                             config_dict=self.config_dict, logger=self.logger, checkpoint_every=0)
            loop.save(loop.final_dir, step=0, epoch=0, step_in_epoch=0)
            return {}
        rows = self.new_rows if check_choice("write.documents", w.documents) == "new" else None
        if rows is not None and not rows:
            raise UsageError("write.documents='new' but every document came from init_from's checkpoint")
        objective = build_component(self.config, "write_objective", {})
        context = self.write_context()
        context.train_rows = rows
        with self.group.main_first():  # what it computes once may be cached on disk for the others
            objective.prepare(context)
        trainer = WritePhaseTrainer(self.model, w, objective)

        def answer_quality(epoch: int, step: int) -> Dict[str, float]:  # e.g. new documents, a trained reader
            if not w.eval_qa_every or (epoch % w.eval_qa_every and epoch != w.epochs):
                return {}
            return {f"eval_{name}": value for name, value in self.evaluate_eval_questions().items()}

        return trainer.fit(self.write_dataset, seed=self.config.seed, checkpoint_root=self.checkpoint_root("write"),
                           config_dict=self.config_dict, logger=self.logger, rows=rows, epoch_end_fn=answer_quality)

    def evaluate_eval_questions(self, predictions_path: Optional[str] = None) -> Dict[str, float]:
        """EM/F1/substring/Recall@k (with intervals) of the model as it is, on the eval questions."""
        e = self.config.eval
        return evaluate_qa(self.model, self.eval_dataset, top_k=self.config.eval_top_k, batch_size=e.batch_size,
                           max_new_tokens=e.max_new_tokens, predictions_path=predictions_path,
                           doc_ids=[d.doc_id for d in self.rows.documents], seed=self.config.seed,
                           index=self.index)

    def recall(self, k: int) -> float:
        """Recall@k of the eval questions, without generating."""
        return evaluate_retrieval(self.model, self.eval_dataset, top_k=k, batch_size=self.config.eval.batch_size,
                                  index=self.index)

    def run_read(self) -> Dict[str, float]:
        r = self.config.read
        if self._finished("read", "epochs", r.epochs, "read.epochs") is not None:
            return {}
        trainer = ReadPhaseTrainer(self.model, r, retrieval_loss=self.retrieval_loss,
                                   generation_loss=self.generation_loss, teacher_llm=self.teacher_llm)
        k = self.config.eval_top_k

        def epoch_end(epoch: int, step: int) -> Dict[str, float]:
            if r.eval_every and (epoch % r.eval_every == 0 or epoch == r.epochs):
                return {f"eval_{name}": value for name, value in self.evaluate_eval_questions().items()}
            return {f"eval_Recall@{k}": self.recall(k)}

        return trainer.fit(self.read_dataset, seed=self.config.seed, checkpoint_root=self.checkpoint_root("read"),
                           config_dict=self.config_dict, logger=self.logger, epoch_end_fn=epoch_end)

    def run_eval(self) -> Dict[str, float]:
        if not self.group.is_main:
            return {}
        path = self.output_dir / self.config.eval.predictions_file
        metrics = self.evaluate_eval_questions(str(path))
        self.logger.add_artifact(str(path), "predictions.jsonl")
        self.logger.set_info("eval_index", describe(self.index))
        for name, value in metrics.items():
            self.logger.log_scalar(f"eval.{name}", value, 0)
        return metrics

    def control(self, section=None):
        """The control ``section`` names (``config.control`` by default), indexed on the corpus once per run."""
        from pqa_core.training.controls import build_control

        section = dict(section or self.config.control)
        built = self.__dict__.setdefault("_controls", {})
        key = repr(sorted(section.items()))
        if key not in built:
            built[key] = build_control(section, self.corpus, self.tokenizer)
        return built[key]

    def control_of_pretrain(self):
        """The control whose input a ``text`` or ``closed_book`` pretrained reader learns to read."""
        from pqa_core.training.pretrain import CONTROL_OF_READER

        return self.control({"name": CONTROL_OF_READER[self.config.pretrain.reader]})

    def run_control_read(self) -> Dict[str, float]:
        """Train the LoRA to answer from the control's input (passage text, or nothing) on the training
        questions, with the read phase's settings: a reader of its own, as pqa's read phase gives pqa one."""
        from pqa_core.training.controls import ControlReaderDataset, ControlReaderTrainer

        r, data = self.config.read, self.config.data
        if self._finished("control_read", "epochs", r.epochs, "read.epochs") is not None:
            return {}
        dataset = ControlReaderDataset(self.control(), self.train_qa, self.tokenizer, top_k=self.config.eval_top_k,
                                       prompt=data.prompt, max_answer_tokens=data.max_answer_tokens)
        return ControlReaderTrainer(self.model, r).fit(dataset, seed=self.config.seed,
                                                       checkpoint_root=self.checkpoint_root("control_read"),
                                                       config_dict=self.config_dict, logger=self.logger)

    def run_control(self) -> Dict[str, float]:
        """Score the control named in ``config.control`` on the eval questions, as ``run_eval`` scores pqa."""
        from pqa_core.training.controls import evaluate_control

        if not self.group.is_main:
            return {}
        e = self.config.eval
        control = self.control()
        path = self.output_dir / e.predictions_file
        metrics = evaluate_control(self.model, control, self.eval_qa, top_k=self.config.eval_top_k,
                                   batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                                   prompt=self.config.data.prompt, predictions_path=str(path),
                                   doc_ids=[d.doc_id for d in self.corpus], seed=self.config.seed)
        self.logger.add_artifact(str(path), "predictions.jsonl")
        for name, value in metrics.items():
            self.logger.log_scalar(f"eval.{name}", value, 0)
        return metrics

    def run(self) -> Dict[str, Any]:
        """Run the configured phases; returns the eval metrics (or the last phase's metrics).
        Holds the output folder's lock throughout: no second run writes these checkpoints (with
        several processes, the main one holds it and alone writes)."""
        with output_folder_lock(self.output_dir) if self.group.is_main else contextlib.nullcontext():
            return self._run_phases()

    def _run_phases(self) -> Dict[str, Any]:
        main = self.group.is_main
        self.logger.set_info("output_dir", str(self.output_dir.resolve()))
        if self.group.active:
            self.logger.set_info("processes", self.group.world)
        result: Dict[str, Any] = {}
        k = self.config.eval_top_k
        if main and not set(self.config.phases) <= {"control", "control_read"}:
            moment = "before_write" if "write" in self.config.phases else "before_read"
            self.logger.set_info(f"Recall@{k}_{moment}",
                                 self.recall(k))
        for phase in PHASES:
            if phase not in self.config.phases:
                continue
            start = time.perf_counter()
            log.info("%s phase: starting", phase)
            result = getattr(self, f"run_{phase}")()
            self.timings[phase] = time.perf_counter() - start
            self.logger.set_info(f"{phase}_seconds", round(self.timings[phase], 2))
            self.logger.set_info(f"{phase}_metrics", result)
            if phase in TRAINED_PHASES:
                self.logger.set_info(f"{phase}_checkpoint", str((self.checkpoint_root(phase) / "final").resolve()))
            if phase == "write" and main:  # the selector scores z: a write objective must not lose retrieval
                self.logger.set_info(f"Recall@{k}_after_write",
                                     self.recall(k))
        if main:
            (self.output_dir / "result.json").write_text(json.dumps(
                {"metrics": result, "timings": self.timings}, indent=1))
        return result


def initial_checkpoint(source: Path) -> Path:
    """``init_from``'s checkpoint: the folder itself, else its run's read or write ``final``. A checkpoint
    folder without its manifest is returned as it is, so that loading or checking it refuses it as torn."""
    candidates = [source] + [source / "checkpoints" / p / "final" for p in ("read", "write")]
    for candidate in candidates:
        if (candidate / MANIFEST).exists():
            return candidate
    if (source / "state.json").exists() or (source / "model.safetensors").exists():
        return source
    raise CheckpointError(f"{source}: no checkpoint found (looked for {MANIFEST} in "
                          f"{', '.join(str(c) for c in candidates)})")


def checkpoints_to_load(config: PQAConfig) -> List[Path]:
    """The checkpoint folders a run of ``config`` will load, so they can be checked before it starts:
    ``init_from``'s, and with ``resume`` each training phase's ``final`` or else its highest step (a
    step folder without its manifest is returned too: it is torn, and checking it refuses it)."""
    found = [initial_checkpoint(Path(config.init_from))] if config.init_from else []
    for phase in TRAINED_PHASES if config.resume else ():
        if phase in config.phases:
            root = Path(config.resume) / "checkpoints" / phase
            steps = sorted(root.glob("step-*"))
            if (root / "final").exists():
                found.append(root / "final")
                # a step checkpoint further (a finished phase that went on, then was killed) is what a resume
                # goes on from (resume_checkpoint), and one as far where a step budget (pretraining's) may
                # have stopped mid-epoch; an epoch phase's final wins a tie
                latest = latest_checkpoint(root)
                at_final, at_latest = checkpoint_position(root / "final"), latest and checkpoint_position(latest)
                if at_final and at_latest and (at_latest["step"] > at_final["step"] or (
                        phase not in EPOCH_BUDGETS and at_latest["step"] == at_final["step"])):
                    found.append(latest)
            elif steps:
                found.append(steps[-1])
    return found


def fingerprint_of(config: PQAConfig) -> Dict[str, Any]:
    """What will determine this run's weights (``fingerprint.py``), known before anything is built."""
    init = initial_checkpoint(Path(config.init_from)) if config.init_from else None
    data = {name: resolve_data_path(getattr(config.data, name)) for name in TRAINING_DATA}
    from pqa_core.modeling.teacher import check_teacher, teacher_spec
    from pqa_core.storage.pretrained import artifact_path

    pretrained = artifact_path(config)
    teacher = teacher_spec(config)
    return fingerprint.compute(config.to_dict(), data, llm_identity(config.model.llm), init, pretrained,
                               components_of_run(config),
                               teacher=check_teacher(teacher, config.model.llm)["sha256"] if teacher else None)


def check_output_dir(config: PQAConfig, run_fingerprint: Dict[str, Any], output_dir: Path) -> List[str]:
    """``resume`` continues only checkpoints of this fingerprint (``force_resume`` lets others through:
    their differences are returned, to be recorded); a run that is no resume refuses a folder that
    already holds checkpoints."""
    if not config.resume:
        fingerprint.check_fresh(output_dir)
        return []
    own = [c for c in checkpoints_to_load(config) if Path(config.resume) in c.parents]
    forced = fingerprint.check_resume(own, run_fingerprint, config.force_resume, f"resume={config.resume}",
                                      defaults=config_defaults(config))
    check_budgets(config, output_dir)
    return forced


EPOCH_BUDGETS = {"write": "write.epochs", "read": "read.epochs", "control_read": "read.epochs"}
PRETRAIN_BUDGET = "pretrain.epochs, pretrain.max_steps"


def pretrain_steps(config: PQAConfig, questions: int) -> int:
    """The steps pretraining takes: every batch of its epochs, or ``pretrain.max_steps`` when fewer."""
    p = config.pretrain
    steps = -(-questions // p.batch_size) * p.epochs
    return min(steps, p.max_steps) if p.max_steps else steps


def check_budget(output_dir: Path, phases, phase: str, unit: str, asked: int, budget: str) -> bool:
    """Whether ``phase``'s checkpoints in ``output_dir`` end where this run's budget does (``asked`` steps or
    epochs, ``unit``; ``budget`` names the config key): its final checkpoint is the phase, finished. Short of
    it the phase goes on from them (nothing depends on a budget but where training stops, so it ends with
    the weights of a run that asked for it from the start). Refused (one line): checkpoints beyond the
    budget (the run would report less training than its weights had), or a finished phase going on under a
    later phase of ``phases`` that already trained on it (a resume would load that phase's checkpoint over
    the continued weights)."""
    root = output_dir / "checkpoints" / phase
    furthest = resume_checkpoint(root)
    at = checkpoint_position(furthest) if furthest is not None else None
    if at is None:  # nothing here (a torn checkpoint: loading it refuses it, naming the file)
        return False
    final = root / "final"
    if unit == "steps":
        done, trained = at["step"], f"{at['step']} steps"
    else:  # a step checkpoint is inside an epoch it has begun
        done = at["epoch"] + (1 if at["step_in_epoch"] else 0)
        trained = f"{at['epoch']} epochs" + (f" and {at['step_in_epoch']} steps of the next" if at["step_in_epoch"] else "")
    if done > asked:
        raise UsageError(f"resume={output_dir}: the {phase} phase already trained {trained} ({furthest}) and this "
                         f"run asks for {asked} {unit} ({budget}): a phase is not cut back; ask for at least {done}, "
                         f"or start a new run (init_from={furthest})")
    if furthest != final:
        return False
    if done == asked:
        return True
    for later in TRAINED_PHASES[TRAINED_PHASES.index(phase) + 1:]:
        if later in phases and any((output_dir / "checkpoints" / later).glob(f"*/{MANIFEST}")):
            raise UsageError(f"resume={output_dir}: {budget} continues the {phase} phase ({done} of {asked} {unit}), "
                             f"but the {later} phase already trained on its result ({output_dir / 'checkpoints' / later}"
                             f"); continue a run's last trained phase only, or start a new run (init_from={final})")
    log.info("%s phase stopped at %d of %d %s in %s: going on", phase, done, asked, unit, final)
    return False


def check_budgets(config: PQAConfig, output_dir: Path) -> None:
    """A resume's budgets, checked before the run exists (``check_budget``)."""
    for phase, key in EPOCH_BUDGETS.items():
        if phase in config.phases:
            section, _, leaf = key.partition(".")
            check_budget(output_dir, config.phases, phase, "epochs", getattr(getattr(config, section), leaf), key)
    if "pretrain" in config.phases and resume_checkpoint(output_dir / "checkpoints" / "pretrain") is not None:
        questions = len(load_qa(resolve_data_path(config.data.qa), load_corpus(resolve_data_path(config.data.corpus))))
        check_budget(output_dir, config.phases, "pretrain", "steps", pretrain_steps(config, questions),
                     PRETRAIN_BUDGET)


def config_defaults(config: PQAConfig) -> Dict[str, Any]:
    """Every key's default (dotted), each component's parameters those of the component this run chose."""
    from pqa_core.components.kinds import COMPONENT_KINDS
    from pqa_core.components.plugins import component_defaults

    defaults = PQAConfig().to_dict()
    for kind in COMPONENT_KINDS:
        section = getattr(config, kind, None)
        if isinstance(section, dict) and section.get("name"):
            defaults[kind] = {**component_defaults(kind, section["name"]), "name": section["name"]}
    return fingerprint.flatten(defaults)
