"""The Sacred experiments users run: ``pretrain`` (the reusable parts, on a disjoint corpus), ``write``,
``read``, ``eval``, ``pipeline`` and ``control`` (a baseline, ``control.name=bm25``, scored like ``eval``).

One config namespace per component kind, so overrides read naturally::

    pqa run pipeline with selector.name=cosine selector.temperature=0.05 read.top_k=10 model.llm=tiny

The defaults are ``pqa_core.config.PQAConfig``'s; named configs hold the common ablations and a
fast smoke run. Observers are attached by the CLI, never here.
"""
from __future__ import annotations

from typing import Any, Dict

from sacred import Experiment
from sacred.config.config_summary import ConfigSummary
from sacred.utils import apply_backspaces_and_linefeeds, iterate_flattened

from pqa_core.config import EXPERIMENT_PHASES, PQAConfig
from pqa_core.components.kinds import KIND
from pqa_core.components.plugins import with_component_defaults

from pqa_experiments.tracking import sacred_fixes

PHASES_OF = EXPERIMENT_PHASES

SMOKE = {
    "threads": 1,
    "model": {"llm": "tiny", "num_memory_tokens": 2, "lora": {"r": 4}},
    "write": {"epochs": 2, "eval_docs": 4, "eval_every": 1},
    "read": {"epochs": 1},
    "eval": {"max_new_tokens": 8},
}

NAMED_CONFIGS: Dict[str, Dict[str, Any]] = {
    # fast end-to-end check on the random tiny model
    "smoke": SMOKE,
    "tiny": {"model": {"llm": "tiny"}},
    # selector ablations
    "selector_dot": {"selector": {"name": "dot"}},
    "selector_cosine": {"selector": {"name": "cosine", "temperature": 0.05}},
    "selector_bilinear": {"selector": {"name": "bilinear"}},
    "selector_mlp": {"selector": {"name": "mlp"}},
    # query encoder ablations
    "encoder_llm_mean": {"query_encoder": {"name": "llm_mean"}},
    "encoder_transformer": {"query_encoder": {"name": "transformer"}},
    # retrieval / generation losses
    "loss_infonce": {"retrieval_loss": {"name": "infonce", "temperature": 1.0}},
    "loss_margin": {"retrieval_loss": {"name": "margin", "margin": 1.0}},
    "distill": {"generation_loss": {"name": "kl_distill", "alpha": 1.0}},
    # write objectives: reconstruction plus distillation of the LLM reading the text
    "distill_write": {"write_objective": {"name": "weighted"}},
    # a control whose reader (LoRA) is trained for its own input first, with the read phase's settings
    "train_reader": {"phases": ["control_read", "control"]},
    # `pqa demo` (pqa and closed-book on the sample in minutes): both readers start from the shipped
    # artifacts for the LLM (model.pretrained=auto: pretrained on SQuAD articles disjoint from the sample; for
    # pqa the one of this shape, pqa-sentences-m64), pqa's documents written as 64 tokens of their most salient
    # sentences, kept as written (write.epochs=0, read.lr_z=0: what that reader was pretrained on), then 2 read
    # epochs on the sample's 108 training questions, no evaluation between epochs (F1 67.0 in 4 min 2 s for
    # both runs; the 120-step reader shipped before: 69.0 after 2 epochs, 66.0 after 1)
    "demo": {"model": {"pretrained": "auto", "num_memory_tokens": 64}, "writer": {"name": "sentences"},
             "write": {"epochs": 0}, "read": {"epochs": 2, "eval_every": 0, "lr_z": 0.0}},
    # the encoder writer (pretrain it first: `pqa run pretrain`, or start from an artifact)
    "encoder_writer": {"writer": {"name": "encoder"}},
    # the read phase straight from the initial z (keywords, MiniLM keys): what the write phase adds
    "no_write": {"phases": ["read", "eval"]},
    # model ablations (the default: hybrid projection, MiniLM key for retrieval, 32 soft tokens per
    # document started from its salient words: tf-idf, names and numbers first; bench/RESULTS.md (a))
    "no_lora": {"model": {"lora": {"enabled": False}}},
    "random_init": {"model": {"doc_init": "random"}},
    "zero_content": {"model": {"content_init": "zero"}},
    "rarest_keywords": {"model": {"keyword_scoring": "idf"}},
    "key_in_prompt": {"projection": {"name": "hybrid", "key_in_prompt": True}},
    # xRAG's setting, pqa's first default: a 384-float z (MiniLM) through a shared MLP to 4 soft tokens
    "mlp_projection": {"projection": {"name": "mlp2x_gelu"}, "model": {"num_memory_tokens": 4}},
    "linear_projection": {"projection": {"name": "linear"}, "model": {"num_memory_tokens": 4}},
    "direct_projection": {"projection": {"name": "direct"}, "model": {"doc_init": "random"}},
    "more_memory": {"model": {"num_memory_tokens": 64}},
}


def default_config(phase: str) -> Dict[str, Any]:
    config = PQAConfig().to_dict()
    config["phases"] = list(PHASES_OF[phase])
    if phase != "control":
        config.pop("control")  # only the control experiment reads it
    return config


class ComponentDefaults:
    """A Sacred config scope (what ``ex.config`` makes of a function: called with the fixed values and
    the config so far, it returns a ``ConfigSummary``) that shows each chosen component's own defaults
    in the config. It runs after overrides are fixed, so ``selector.name=mlp`` brings in mlp's
    defaults, not cosine's ``temperature``; explicit values win. It sets whole component sections, as
    a function scope assigning ``selector = ...`` would, so a component parameter given on the command
    line is judged by the component's signature (pre-flight), not refused by Sacred as a new key."""

    def __call__(self, fixed=None, preset=None, fallback=None):
        fixed, preset = fixed or {}, preset or {}
        summary = ConfigSummary(added={path for path, _ in iterate_flattened(fixed) if path.split(".")[0] not in KIND})
        for kind in KIND:
            if isinstance(preset.get(kind), dict):
                summary[kind] = with_component_defaults(kind, {**preset[kind], **fixed.get(kind, {})})
        return summary


def make_experiment(phase: str) -> Experiment:
    if phase not in PHASES_OF:
        raise KeyError(phase)
    sacred_fixes.install()  # Sacred's git lookup crashes in a repository without commits
    ex = Experiment(f"pqa_{phase}")
    ex.captured_out_filter = apply_backspaces_and_linefeeds
    ex.add_config(default_config(phase))
    sacred_fixes.add_config_scope(ex, ComponentDefaults())
    for name, values in NAMED_CONFIGS.items():
        ex.add_named_config(name, values)

    @ex.main
    def main(_config, _run):
        from pqa_experiments.tracking.bridge import run_pipeline_in_sacred

        return run_pipeline_in_sacred(_config, _run)

    return ex
