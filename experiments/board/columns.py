"""Omniboard's own column settings, seeded for pqa runs: ``pqa board`` opens on the component names,
the key hyper-parameters and the final EM / F1 / Recall@k instead of id, host and command only.

Omniboard (2.16) keeps its custom columns (a config path shown as a column) in the collection
``omniboard.custom.columns`` as ``{name, config_path}`` and its metric columns (a rollup of a metric
series) in ``omniboard.metric.columns`` as ``{name, metric_name, extrema, lastn}``; its column
dialogs edit those same documents. pqa adds a column only when no column has its name or its path
(metric) and pqa never added it before: ``pqa.board_columns`` remembers what pqa added, so a column
the user removed, renamed or changed stays as the user left it.
"""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

from pqa_core.components.kinds import KINDS

CUSTOM = "omniboard.custom.columns"
METRIC = "omniboard.metric.columns"
SEEDED = "pqa.board_columns"

HYPER_PARAMETERS: Tuple[Tuple[str, str], ...] = (
    ("LLM", "config.model.llm"),
    ("d_z", "config.model.d_z"),
    ("memory_tokens", "config.model.num_memory_tokens"),
    ("top_k", "config.read.top_k"),
    ("retrieval_weight", "config.read.retrieval_weight"),
    ("write_epochs", "config.write.epochs"),
    ("read_epochs", "config.read.epochs"),
    ("write_lr_z", "config.write.lr_z"),
    ("read_lr_z", "config.read.lr_z"),
)
DEFAULT_RECALL_K = 3


FINAL_METRICS = ("EM", "F1")  # then Recall@k for every k the runs logged
METRIC_PATTERN = rf"^({'|'.join(FINAL_METRICS)}|Recall@\d+)$"
"""The metric columns pqa seeds: shown rounded, as the CLI rounds them."""


def layout() -> Dict[str, object]:
    """What ``pqa board``'s launcher needs to open the run table on pqa's columns: the custom columns
    first (``first``), then the metric columns (``metrics``, a pattern), the raw config sections hidden."""
    return {"first": [name for name, _ in custom_columns()], "metrics": METRIC_PATTERN}


def custom_columns() -> List[Tuple[str, str]]:
    """(column name, config path): each component kind's chosen name, then the key hyper-parameters."""
    return [(kind.name, f"config.{kind.name}.name") for kind in KINDS] + list(HYPER_PARAMETERS)


def metric_columns(db) -> List[Tuple[str, str]]:
    """(column name, metric name) of the final evaluation metrics: ``eval.EM``, ``eval.F1`` and
    ``eval.Recall@k`` for each k in the run store (k=3, the default, when there is none yet)."""
    recall = sorted({int(m.group(1)) for name in db.metrics.distinct("name")
                     if (m := re.fullmatch(r"eval\.Recall@(\d+)", str(name)))}) or [DEFAULT_RECALL_K]
    return [(name, f"eval.{name}") for name in FINAL_METRICS] + [(f"Recall@{k}", f"eval.Recall@{k}") for k in recall]


def seed_columns(db) -> Dict[str, List[str]]:
    """Add pqa's columns to Omniboard's settings in database ``db`` (a pymongo ``Database``) where the
    user has no column of that name or path and pqa has not added it before; returns what was added."""
    done = db[SEEDED].find_one({"_id": "columns"}) or {}
    added: Dict[str, List[str]] = {"custom": [], "metric": []}
    plan = (("custom", CUSTOM, "config_path", custom_columns(), {}),
            ("metric", METRIC, "metric_name", metric_columns(db), {"extrema": "last", "lastn": 1}))
    for key, collection, path_field, wanted, extra in plan:
        existing = list(db[collection].find({}, {"name": 1, path_field: 1}))
        names = {doc.get("name") for doc in existing}
        paths = {doc.get(path_field) for doc in existing}
        for name, path in wanted:
            if name in done.get(key, []) or name in names or path in paths:
                continue
            db[collection].update_one({"name": name}, {"$setOnInsert": {"name": name, path_field: path, **extra}},
                                      upsert=True)
            added[key].append(name)
    if added["custom"] or added["metric"]:
        db[SEEDED].update_one({"_id": "columns"}, {"$addToSet": {"custom": {"$each": added["custom"]},
                                                                   "metric": {"$each": added["metric"]}}},
                              upsert=True)
    return added
