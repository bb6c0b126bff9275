"""``pqa plugin new NAME``: a plugin package that installs, registers one component and passes its test.

The package has a ``pyproject.toml`` with the ``pqa`` entry point, a module with one working
component of the chosen kind (its ``__init__`` keyword arguments are its config) and a test that runs
pqa's contract check on it (``pqa_core.testing``). It is written to a temp folder and renamed into
place, so a failure leaves nothing half-written.
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Dict

from pqa_core.storage.atomic import atomic_directory
from pqa_core.errors import UsageError
from pqa_core.components.kinds import KIND

# kind -> (interface, imports, class body). {cls} is the class name; the docstring's first line is what
# `pqa plugins --verbose` shows.
COMPONENTS: Dict[str, tuple] = {
    "selector": ("Selector", "import torch", '''
        """Scores documents by negative squared distance to the query, divided by ``temperature``."""

        def __init__(self, temperature: float = 1.0):
            super().__init__()
            self.temperature = float(temperature)

        def forward(self, query_vectors, doc_vectors):
            # [B, d] x [N, d] -> [B, N], higher is better
            return -torch.cdist(query_vectors, doc_vectors).pow(2) / self.temperature
    '''),
    "query_encoder": ("QueryEncoder", "from torch import nn", '''
        """Mean of a trainable token embedding over the question, then ``Linear(dim, output_dim)``."""

        def __init__(self, vocab_size: int, output_dim: int, dim: int = 64):
            super().__init__()
            self.output_dim = int(output_dim)
            self.embedding = nn.Embedding(vocab_size, dim)
            self.head = nn.Linear(dim, self.output_dim)

        def forward(self, input_ids, attention_mask):
            # [B, T] token ids of the LLM's tokenizer -> [B, output_dim]
            mask = attention_mask.unsqueeze(-1).float()
            pooled = (self.embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
            return self.head(pooled)
    '''),
    "projection": ("Projection", "import torch\nfrom torch import nn", '''
        """``tanh(Linear(z))`` as ``num_tokens`` soft tokens, scaled to the LLM's embedding std."""

        def __init__(self, d_z: int, d_model: int, num_tokens: int, embedding_std: float = 0.02):
            super().__init__()
            self.num_tokens, self.d_model, self.scale = int(num_tokens), int(d_model), float(embedding_std)
            self.proj = nn.Linear(d_z, self.num_tokens * self.d_model)

        def forward(self, z):
            # [..., d_z] -> [..., num_tokens, d_model]
            out = torch.tanh(self.proj(z)) * self.scale
            return out.view(*z.shape[:-1], self.num_tokens, self.d_model)
    '''),
    "writer": ("Writer", "import torch\nfrom torch import nn", '''
        """Soft tokens from the mean input embedding of a document's tokens plus ``num_tokens`` trained offsets."""

        trainable = True

        def __init__(self, llm, d_model: int, num_tokens: int, embedding_std: float = 0.02):
            super().__init__()
            self.embeddings = llm.get_input_embeddings()  # the LLM's: referenced, not trained here
            self.offsets = nn.Parameter(torch.randn(int(num_tokens), int(d_model)) * float(embedding_std))

        def forward(self, token_ids):
            # B lists of LLM token ids -> [B, num_tokens, d_model], with gradient to the offsets
            device = self.offsets.device
            means = torch.stack([self.embeddings(torch.tensor(ids or [0], device=device)).mean(0)
                                 for ids in token_ids]).float()
            return means[:, None, :] + self.offsets

        @torch.no_grad()
        def write_documents(self, texts, token_ids):
            # N documents -> [N, num_tokens, d_model], no gradient
            return self(token_ids)
    '''),
    "retrieval_loss": ("RetrievalLoss", "import torch", '''
        """``-log`` of the softmax mass on the gold documents at ``temperature``, mean over questions."""

        def __init__(self, temperature: float = 1.0):
            super().__init__()
            self.temperature = float(temperature)

        def forward(self, scores, gold_mask):
            # scores [B, N], gold_mask [B, N] (bool) -> a scalar
            logits = scores.float() / self.temperature
            gold = logits.masked_fill(~gold_mask.bool(), float("-inf"))
            return (torch.logsumexp(logits, dim=-1) - torch.logsumexp(gold, dim=-1)).mean()
    '''),
    "generation_loss": ("GenerationLoss", "import torch.nn.functional as F", '''
        """Token cross-entropy with label smoothing ``smoothing``."""

        def __init__(self, smoothing: float = 0.1):
            super().__init__()
            self.smoothing = float(smoothing)

        def forward(self, logits, labels, teacher_logits=None):
            # logits [B, T, V], labels [B, T] (-100 = ignore) -> a scalar
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=-100, label_smoothing=self.smoothing)
    '''),
    "write_objective": ("WriteObjective", "import torch\nimport torch.nn.functional as F", '''
        """Cross-entropy of the document's first ``max_tokens`` tokens given its soft prompt alone."""

        def __init__(self, max_tokens: int = 32):
            super().__init__()
            self.max_tokens = int(max_tokens)

        def prepare(self, context):
            # once before the write phase: each row's target tokens
            eos = context.tokenizer.eos_token_id
            self.pad = context.tokenizer.pad_token_id if context.tokenizer.pad_token_id is not None else eos
            self.targets = [list(ids[:self.max_tokens]) + [eos] for ids in context.doc_tokens]

        def forward(self, model, rows):
            # rows [B] of doc_vectors -> a scalar; z is reached only through these rows' soft prompts
            targets = [self.targets[row] for row in rows.tolist()]
            ids = torch.full((len(targets), max(map(len, targets))), self.pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, target in enumerate(targets):
                ids[i, :len(target)], mask[i, :len(target)] = torch.tensor(target), 1
            ids, mask = ids.to(rows.device), mask.to(rows.device)
            prefix = model.soft_prompts(rows[:, None])
            logits, labels = model.continuation_logits(prefix, ids[:, :0], mask[:, :0], ids, mask)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=-100)
    '''),
    "control": ("Control", "", '''
        """The ``k`` passages sharing the most words with the question."""

        def select(self, examples, k):
            # per question: up to k corpus rows, best first, and their scores
            rows, scores = [], []
            for example in examples:
                words = set(example.question.lower().split())
                overlap = [len(words & set(text.lower().split())) for text in self.passages]
                best = sorted(range(len(overlap)), key=lambda row: -overlap[row])[:k]
                rows.append(best)
                scores.append([float(overlap[row]) for row in best])
            return rows, scores
    '''),
}
assert set(COMPONENTS) == set(KIND), "pqa plugin new needs a component template for every kind"

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "A pqa plugin: the {kind} '{component}'"
dependencies = ["torch"]

[project.entry-points.pqa]
{module} = "{module}"

[tool.setuptools]
packages = ["{module}"]
'''

MODULE = '''\
"""pqa plugin {dist}: the {kind} '{component}'.

pqa builds it by name (``{kind}.name={component}``); its ``__init__`` keyword arguments are its config
(``{kind}.<parameter>=...``), and parameters named like the model's context (``d_z``, ``d_model``,
``num_tokens``, ``llm``, ``vocab_size`` ... see pqa's README) are supplied by the model.
"""
{imports}
from pqa_core.hookspecs import hookimpl
from pqa_core.interfaces import {interface}


class {cls}({interface}):
{body}

@hookimpl
def {hook}(register):
    register("{component}", {cls})
'''

TEST = '''\
"""pqa's contract check on the tiny model: the check ``pqa run`` makes before a run exists."""
import {module}
from pqa_core.testing import check_plugin, plugin_registered


def test_{component}_keeps_the_pqa_contract():
    with plugin_registered({module}):
        check_plugin("{kind}", "{component}")
'''

README = '''\
# {dist}

A pqa plugin adding the {kind} `{component}`.

```bash
pip install -e .                 # registers the entry point "{module}" in the group "pqa"
pqa plugins check {component}    # pqa's contract check
pytest tests/                    # the same, as a test
pqa run pipeline with {kind}.name={component}
```
'''


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[_\W]+", name) if part)


def check_module_name(name: str, module: str) -> None:
    """The package's module may be neither a Python keyword (``import import``) nor the name of a module
    Python can already import (numpy, torch, os, pqa_core): installed, it would replace that one."""
    import importlib.util
    import keyword
    import sys

    if keyword.iskeyword(module) or keyword.issoftkeyword(module):
        raise UsageError(f"plugin name {name!r}: {module!r} is a Python keyword, so `import {module}` cannot work; "
                         f"choose another name (such as pqa_{module})")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    # a folder of that name on the path (a namespace package, such as a skeleton just written) is no module
    found = module in sys.builtin_module_names or module in sys.stdlib_module_names or \
        (spec is not None and spec.origin not in (None, "namespace"))
    if found:
        raise UsageError(f"plugin name {name!r}: a module {module!r} is already importable here, and the plugin's "
                         f"package would replace it once installed; choose another name (such as pqa_{module})")


def write_skeleton(name: str, kind: str, parent: Path) -> Path:
    """Write the package ``parent/name``; returns its folder. ``UsageError`` for a bad name or kind,
    or when the folder exists."""
    if kind not in COMPONENTS:
        raise UsageError(f"unknown component kind {kind!r}; kinds: {', '.join(COMPONENTS)}")
    module = name.replace("-", "_").lower()
    if not re.fullmatch(r"[a-z][a-z0-9_]*", module):
        raise UsageError(f"plugin name {name!r}: use letters, digits, '-' and '_', starting with a letter")
    check_module_name(name, module)
    target = Path(parent) / name
    if target.exists():
        raise UsageError(f"{target} already exists; choose another name or remove it")
    component = re.sub(r"^pqa_", "", module)
    from pqa_core.components.plugins import components

    taken = components(kind).get(component)
    if taken is not None:  # its test would pass by testing the component that already has the name
        raise UsageError(f"{kind} {component!r} is taken by {taken.describe()}; choose another plugin name "
                         f"(its component is named after it), e.g. {name}-2")
    interface, imports, body = COMPONENTS[kind]
    kind_class = _camel(kind)
    cls = _camel(component) if _camel(component).endswith(kind_class) else _camel(component) + kind_class
    values = dict(dist=name, module=module, component=component, kind=kind, interface=interface,
                  imports=imports, cls=cls, hook=KIND[kind].hook,
                  body=textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n")
    with atomic_directory(target, replace=False) as tmp:
        (tmp / module).mkdir()
        (tmp / "tests").mkdir()
        (tmp / "pyproject.toml").write_text(PYPROJECT.format(**values))
        (tmp / module / "__init__.py").write_text(MODULE.format(**values))
        (tmp / "tests" / f"test_{module}.py").write_text(TEST.format(**values))
        (tmp / "README.md").write_text(README.format(**values))
    return target
