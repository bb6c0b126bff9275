"""One declaration per setting (issue 18): a config key's type, default, range or choices and help live
on its dataclass field, and nothing else can disagree with them."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from pqa_core.config import CHOICES, KEYS, RANGES, PQAConfig
from pqa_core.errors import UsageError


def _entry_points():
    """Every public function and method of the evaluation and training packages (and the model's
    generation): the library a notebook calls with the run's settings."""
    import pqa_core.evaluation
    import pqa_core.training
    from pqa_core.modeling.model import ParametricQA

    for package in (pqa_core.evaluation, pqa_core.training):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            for name, obj in vars(module).items():
                if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                    continue
                if inspect.isfunction(obj):
                    yield f"{module.__name__}.{name}", obj
                elif inspect.isclass(obj):
                    for attr, method in vars(obj).items():
                        if inspect.isfunction(method) and (attr == "__init__" or not attr.startswith("_")):
                            yield f"{module.__name__}.{name}.{attr}", method
    yield "pqa_core.modeling.model.ParametricQA.generate", ParametricQA.generate


def test_no_library_default_disagrees_with_the_config():
    """A parameter named as a config key (top_k, batch_size, max_new_tokens, prompt, ...) either has no
    default, or the default every config key of that name has: evaluate_qa's top_k=5 against
    read.top_k=3, evaluate_retrieval's batch_size=32 against eval.batch_size=16, are named."""
    defaults = {}
    for path, key in KEYS.items():
        defaults.setdefault(path.rsplit(".", 1)[-1], set()).add(repr(key.default))
    found, checked = [], 0
    for where, function in _entry_points():
        for name, param in inspect.signature(function).parameters.items():
            if name not in defaults or name == "name" or param.default is None:  # None: taken from its object
                continue
            checked += 1
            if param.default is not inspect.Parameter.empty and {repr(param.default)} != defaults[name]:
                found.append(f"{where}({name}={param.default!r}): the config says "
                             f"{' / '.join(sorted(defaults[name]))}")
    assert checked > 10
    assert found == [], "\n".join(found)


def test_every_key_is_declared_once_with_help():
    for path, key in KEYS.items():
        assert key.help, f"{path}: give it a help line in pqa_core/config.py"
    assert RANGES["read.top_k"] is KEYS["read.top_k"].range
    assert CHOICES["read.key_updates"] == ("all", "batch", "none")
    assert KEYS["read.lr_projection"].type_name == "Optional[float]"


def test_module_lists_are_the_declared_choices():
    from pqa_core.modeling import doc_table, keywords

    assert tuple(doc_table.DTYPES) == CHOICES["model.doc_dtype"]
    assert tuple(keywords.SCORINGS) == CHOICES["model.keyword_scoring"]


@pytest.mark.parametrize("values, message", [
    ({"read": {"key_updates": "typo"}}, "config key 'read.key_updates' = 'typo': must be one of all, batch, none"),
    ({"read": {"key_updates": "bach"}}, "must be one of all, batch, none; did you mean 'batch'?"),
    ({"read": {"topk": 2}}, "unknown config key 'read.topk'; did you mean 'read.top_k'? known keys under read: "),
    ({"top_k": 2}, "unknown config key 'top_k'; did you mean 'read.top_k'?"),
    ({"model": {"lora": {"rank": 2}}}, "unknown config key 'model.lora.rank'; did you mean 'model.lora.r'?"),
    ({"seed": None}, "config key 'seed' may not be null"),
    ({"model": {"pretrained": 3}}, "config key 'model.pretrained' must be str, got 3"),
    ({"model": {"gradient_checkpointing": "no"}}, "config key 'model.gradient_checkpointing' must be true/false, got 'no'"),
])
def test_a_bad_key_or_value_is_named_with_a_suggestion(values, message):
    with pytest.raises(UsageError) as error:
        PQAConfig.from_dict(values)
    assert message in str(error.value)


def test_types_come_from_the_annotations():
    config = PQAConfig.from_dict({"read": {"lr_projection": None, "lr_z": 1}, "eval": {"top_k": None}})
    assert config.read.lr_projection is None and config.read.lr_z == 1.0 and isinstance(config.read.lr_z, float)
    assert PQAConfig.from_dict({"write": {"betas_z": (0.9, 0.99)}}).write.betas_z == [0.9, 0.99]
    # a boolean as a command line spells it (`with model.gradient_checkpointing=false`) is the boolean
    assert PQAConfig.from_dict({"model": {"gradient_checkpointing": "false"}}).model.gradient_checkpointing is False
    assert PQAConfig.from_dict({"model": {"gradient_checkpointing": "True"}}).model.gradient_checkpointing is True


def test_pqa_config_prints_every_key_with_type_default_range_and_help():
    from click.testing import CliRunner

    from pqa_experiments.cli.main import cli

    result = CliRunner().invoke(cli, ["config"])
    assert result.exit_code == 0, result.output
    for path in KEYS:
        assert f"\n{path}: " in "\n" + result.output, path
    assert "read.top_k: int = 3  (an integer >= 1)\n    documents read per question" in result.output
    assert "read.key_updates: str = \"all\"  (one of all, batch, none)" in result.output
    section = CliRunner().invoke(cli, ["config", "eval.faiss"])
    assert section.exit_code == 0 and section.output.count("\n    ") == 5
    typo = CliRunner().invoke(cli, ["config", "raed"])
    assert typo.exit_code == 2 and "did you mean 'read'?" in typo.output


def test_the_datasets_and_contracts_default_to_the_configs_values():
    """Defaults whose names differ from their keys' (max_query_length for data.max_query_tokens) come from
    the config's declaration: a dataset built without them reads questions as a run does."""
    from pqa_core.config import DataSettings
    from pqa_core.data.loading import ReadPhaseDataset
    from pqa_core.interfaces import Control, WriteContext

    params = inspect.signature(ReadPhaseDataset.__init__).parameters
    data = DataSettings()
    assert (params["max_query_length"].default, params["max_answer_length"].default, params["prompt"].default) == \
        (data.max_query_tokens, data.max_answer_tokens, data.prompt)
    assert inspect.signature(Control.prepare).parameters["prompt"].default == data.prompt
    assert {f.name: f.default for f in __import__("dataclasses").fields(WriteContext)}["prompt"] == data.prompt
