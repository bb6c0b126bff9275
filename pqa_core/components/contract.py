"""The plugin contract, checked before a run exists.

Each chosen component is built on the model's context (``kinds.MODEL_CONTEXT``, from a stand-in of
the run's LLM: its own sizes and tokenizer, one layer of random weights) and called once on small
inputs. The probe of its kind checks what the run relies on: output shapes and dtypes, finite
values, a scalar loss, and that gradients reach what training updates through it. A component that
fails to build, raises, or breaks the contract is one ``ContractError`` (a usage error, exit 2)
naming the kind, the component, its plugin and its package: nothing has been stored yet.
"""
from __future__ import annotations

import contextlib
import logging
import random
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import torch

from pqa_core.components import plugins
from pqa_core.errors import UsageError
from pqa_core.components.kinds import KIND, MODEL_KINDS, kinds_for
from pqa_core.components.parameters import check_values

B, K, N, T = 2, 3, 5, 4  # questions, documents read per question, documents scored, answer tokens
SMALL_VOCAB = 11  # logits width for a loss checked without a model context


class ContractError(UsageError):
    """A component does not do what its kind promises (exit 2, before the run exists)."""


class _Broken(Exception):
    """Raised by a probe: what the component did wrong."""


def _shape(tensor) -> str:
    return str(tuple(tensor.shape)) if torch.is_tensor(tensor) else f"a {type(tensor).__name__}"


def _expect_tensor(value, shape, what: str, layout: str) -> torch.Tensor:
    if not torch.is_tensor(value):
        raise _Broken(f"{what} returned {_shape(value)}, expected a tensor {layout}")
    if tuple(value.shape) != tuple(shape):
        raise _Broken(f"{what} returned shape {_shape(value)}, expected {tuple(shape)} = {layout}")
    if not value.is_floating_point():
        raise _Broken(f"{what} returned dtype {value.dtype}, expected a floating point tensor")
    if not bool(torch.isfinite(value.detach()).all()):
        raise _Broken(f"{what} returned NaN or inf")
    return value


def _expect_scalar_loss(value, what: str, grad_of: torch.Tensor, grad_name: str) -> None:
    if not torch.is_tensor(value):
        raise _Broken(f"{what} returned {_shape(value)}, expected a scalar tensor")
    if value.dim() != 0:
        raise _Broken(f"{what} returned shape {_shape(value)}, expected a scalar (shape ()): reduce it, e.g. .mean()")
    _expect_tensor(value, (), what, "a scalar")
    if not value.requires_grad:
        raise _Broken(f"{what} is not connected to the graph: no gradient reaches the {grad_name}")
    value.backward()
    if grad_of.grad is None:
        raise _Broken(f"{what}: no gradient reaches the {grad_name}")


def _backward(value: torch.Tensor, generator: torch.Generator) -> None:
    """Back-propagate a random weighting of ``value`` (non-zero for any map that uses its input)."""
    if not value.requires_grad:
        return
    (value * torch.randn(value.shape, generator=generator, dtype=value.dtype)).sum().backward()


def _has_grad(tensor: torch.Tensor) -> bool:
    return tensor.grad is not None and bool(tensor.grad.abs().sum() > 0)


# --------------------------------------------------------------------------- probes, one per kind


def probe_projection(projection, context, g) -> None:
    d_z, m, d_model = context["d_z"], context["num_tokens"], context["d_model"]
    key_dims = getattr(projection, "key_dims", None)
    if key_dims is not None and not (isinstance(key_dims, int) and 0 < key_dims <= d_z):
        raise _Broken(f"key_dims={key_dims!r}: expected None or an int in 1..d_z={d_z}")
    z = (torch.randn(B, K, d_z, generator=g) * context.get("input_std", 1.0)).requires_grad_()
    out = _expect_tensor(projection(z), (B, K, m, d_model), f"projection(z {list(z.shape)})",
                         "[..., num_tokens, d_model]")
    _backward(out, g)
    if not _has_grad(z):
        raise _Broken("no gradient reaches z through the projection (the write phase trains z through it)")


def probe_query_encoder(encoder, context, g) -> None:
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is not None:  # an encoder with its own vocabulary reads its own token ids
        encoded = tokenizer(["Who built the lighthouse?", "How tall is it?"], padding=True, return_tensors="pt")
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
    else:
        ids = torch.randint(0, context["vocab_size"], (B, 6), generator=g)
        mask = torch.ones(B, 6, dtype=torch.long)
        mask[1, 4:] = 0
        ids[1, 4:] = context.get("pad_token_id") or 0
    what = f"query_encoder(input_ids {list(ids.shape)}, attention_mask {list(mask.shape)})"
    out = _expect_tensor(encoder(ids, mask), (B, context["output_dim"]), what, "[B, output_dim]")
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    if trainable:
        if not out.requires_grad:
            raise _Broken(f"{what}: output not connected to its trainable parameters (the read phase trains them)")
        _backward(out, g)
        if not any(p.grad is not None for p in trainable):
            raise _Broken(f"{what}: no gradient reaches its trainable parameters")


def probe_selector(selector, context, g) -> None:
    d = context["d_z"]
    queries = torch.randn(B, context["output_dim"], generator=g).requires_grad_()
    docs = torch.randn(N, d, generator=g).requires_grad_()
    what = f"selector(query_vectors {list(queries.shape)}, doc_vectors {list(docs.shape)})"
    out = _expect_tensor(selector(queries, docs), (B, N), what, "[B, N]")
    _backward(out, g)
    if not _has_grad(docs):
        raise _Broken(f"{what}: no gradient reaches the doc vectors (the retrieval loss trains them through it)")
    if not _has_grad(queries):
        raise _Broken(f"{what}: no gradient reaches the query vectors (the retrieval loss trains the query "
                      f"encoder through it)")


def probe_retrieval_loss(loss, context, g) -> None:
    scores = torch.randn(B, N, generator=g).requires_grad_()
    gold = torch.zeros(B, N, dtype=torch.bool)
    gold[0, 1] = gold[1, 0] = gold[1, 3] = True  # one row with one gold document, one with two
    _expect_scalar_loss(loss(scores, gold), f"retrieval_loss(scores {list(scores.shape)}, gold_mask "
                                            f"{list(gold.shape)})", scores, "scores")


def probe_generation_loss(loss, context, g) -> None:
    vocab = context.get("vocab_size") or SMALL_VOCAB
    logits = torch.randn(B, T, vocab, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (B, T), generator=g)
    labels[1, T - 1] = -100  # padding is ignored
    what = f"generation_loss(logits {list(logits.shape)}, labels {list(labels.shape)}"
    if getattr(loss, "needs_teacher", False):
        teacher = torch.randn(B, T, vocab, generator=g)
        _expect_scalar_loss(loss(logits, labels, teacher_logits=teacher), what + ", teacher_logits)", logits, "logits")
    else:
        _expect_scalar_loss(loss(logits, labels), what + ")", logits, "logits")


def probe_control(control, context, g) -> None:
    from pqa_core.data.loading import Document, QAExample

    corpus = [Document(i, f"Doc {i}", f"Passage {i} about the lighthouse number {i}.") for i in range(4)]
    examples = [QAExample("q0", "Which lighthouse is number 2?", ["2"], [2], [2]),
                QAExample("q1", "What is passage 0 about?", ["the lighthouse"], [0], [0])]
    control.index(corpus, None)
    selected = control.select(examples, 2)
    if not (isinstance(selected, tuple) and len(selected) == 2):
        raise _Broken(f"select(examples, k) returned {type(selected).__name__}, expected (rows, scores or None)")
    rows, scores = selected
    rows = rows.tolist() if hasattr(rows, "tolist") else rows
    if len(rows) != len(examples):
        raise _Broken(f"select(2 questions, k=2) returned {len(rows)} row lists, expected one per question")
    for row in rows:
        if len(row) > 2 or any(int(r) != r or not 0 <= int(r) < len(corpus) for r in row):
            raise _Broken(f"select(..., k=2) returned rows {list(row)}: expected at most 2 corpus rows in 0..3")
    if scores is not None:
        scores = scores.tolist() if hasattr(scores, "tolist") else scores
        if len(scores) != len(rows) or any(len(s) != len(r) for s, r in zip(scores, rows)):
            raise _Broken("select returned scores that do not match its rows (one score per row, or None)")


PROBE_TEXTS = ["The lighthouse at Marrowick is 38 metres tall.", "Ilse Brandvold sold 2,300 chronometers.",
               "The lifeboat Persistence rescued the crew.", "Lake Vennick freezes in winter."]


def probe_write_objective(objective, context, g) -> None:
    from pqa_core.data.loading import Document, QAExample
    from pqa_core.interfaces import WriteContext

    model = context["model"]
    documents = [Document(i, f"Doc {i}", text) for i, text in enumerate(PROBE_TEXTS)]
    doc_tokens = model.tokenizer(PROBE_TEXTS, add_special_tokens=False)["input_ids"]
    questions = [QAExample("q0", "How tall is the lighthouse at Marrowick?", ["38 metres"], [0], [0]),
                 QAExample("q1", "Which lifeboat rescued the crew?", ["Persistence"], [2], [2])]
    objective.prepare(WriteContext(model=model, tokenizer=model.tokenizer, documents=documents,
                                   doc_tokens=doc_tokens, questions=questions, question_rows=[[0], [2]]))
    rows = torch.tensor([0, 2])
    _expect_scalar_loss(objective(model, rows), "write_objective(model, rows [0, 2])", model.doc_vectors,
                        "rows' z (model.doc_vectors)")
    grad = model.doc_vectors.grad
    grad = grad.to_dense() if grad.is_sparse else grad
    moved = grad.abs().sum(-1) > 0
    if not bool(moved[rows].any()):
        raise _Broken("write_objective(model, rows [0, 2]): no gradient reaches the rows' z")
    if bool(moved[[1, 3]].any()):
        raise _Broken("write_objective(model, rows [0, 2]) moves the z of rows 1 and 3, which are not in the batch "
                      "(reach z through model.doc_latents(rows) or model.soft_prompts)")


def probe_writer(writer, context, g) -> None:
    m, d_model = context["num_tokens"], context["d_model"]
    tokenizer = context.get("tokenizer")
    if tokenizer is None:
        raise _Broken("a writer is checked with the LLM's tokenizer in its context")
    tokens = tokenizer(PROBE_TEXTS, add_special_tokens=False)["input_ids"]
    what = f"writer.write_documents({len(PROBE_TEXTS)} texts, their token ids)"
    _expect_tensor(writer.write_documents(PROBE_TEXTS, tokens), (len(PROBE_TEXTS), m, d_model), what,
                   "[N, num_tokens, d_model]")
    if getattr(writer, "trainable", False):
        trainable = [p for p in writer.parameters() if p.requires_grad]
        out = _expect_tensor(writer(tokens[:B]), (B, m, d_model), f"writer(token_ids of {B} documents)",
                             "[B, num_tokens, d_model]")
        _backward(out, g)
        if not trainable or not any(_has_grad(p) for p in trainable):
            raise _Broken("writer(token_ids): no gradient reaches its trainable parameters (pretraining trains them)")


PROBES: Dict[str, Callable[[Any, Mapping[str, Any], torch.Generator], None]] = {
    "writer": probe_writer,
    "projection": probe_projection,
    "query_encoder": probe_query_encoder,
    "selector": probe_selector,
    "retrieval_loss": probe_retrieval_loss,
    "generation_loss": probe_generation_loss,
    "write_objective": probe_write_objective,
    "control": probe_control,
}
assert set(PROBES) == set(KIND), "every kind in kinds.KINDS needs a probe"


# --------------------------------------------------------------------------- checking


@contextlib.contextmanager
def _quiet_logs():
    """A component's own info logs (a teacher being prepared ...) describe the run, not this check."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def _isolated_rng():
    """The check draws no numbers from the run's generators: a run is the same with or without it."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def check_component(kind: str, name: str, kwargs: Optional[Mapping[str, Any]] = None,
                    context: Optional[Mapping[str, Any]] = None):
    """Build component ``name`` of ``kind`` and call it once on small inputs; returns it built.

    ``context`` is the model context (``kinds.MODEL_CONTEXT``; for a query encoder and a selector, the
    retrieval key's); kinds that get none are built without it and probed at its sizes.
    Raises ``ContractError`` (or ``UsageError`` for a bad name or parameter) naming the component.
    """
    context = dict(context or {})
    component = plugins.validate(kind, name, kwargs)
    described = component.describe()
    try:  # a declaration its own default breaks (Range(1) with a default of 0)
        check_values(described, component.factory, plugins.component_defaults(kind, name))
    except UsageError as exc:
        raise ContractError(f"{exc} (its default)") from None
    with _isolated_rng(), _quiet_logs():
        try:
            built = plugins.build(kind, name, kwargs, context if KIND[kind].context else None)
        except UsageError as exc:
            raise ContractError(f"{described}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a plugin's failure becomes one line naming it
            raise ContractError(f"{described} failed to build: {_first_line(exc)}") from None
        interface = KIND[kind].interface
        if not isinstance(built, interface):
            raise ContractError(f"{described} built a {type(built).__name__}, not a "
                                f"{interface.__module__}.{interface.__name__}")
        generator = torch.Generator().manual_seed(0)
        try:
            with torch.enable_grad():
                PROBES[kind](built, context, generator)
        except _Broken as exc:
            raise ContractError(f"{described} breaks its contract: {exc}") from None
        except Exception as exc:  # noqa: BLE001
            raise ContractError(f"{described} raised {_first_line(exc)} when called on small inputs") from None
        if isinstance(built, torch.nn.Module):
            built.zero_grad(set_to_none=True)
    return built


def check_component_settings(config) -> tuple:
    """The name, parameter names and values of every component a run of ``config`` builds, without
    building any (cheap); returns their kinds."""
    chosen = kinds_for(config.phases)
    for kind in chosen:
        section = dict(getattr(config, kind.name))
        plugins.validate(kind.name, section.pop("name"), section)
    return chosen


def check_config_components(config, llm_and_tokenizer=None) -> Dict[str, Any]:
    """Pre-flight for a run of ``config``: the names, parameter names and values of every component it
    builds (cheap, first), then each one's contract on a stand-in of the model. Returns them built
    (by kind name): their tensor names are the model's."""
    from pqa_core.modeling.llm import load_llm_stand_in

    chosen = check_component_settings(config)
    return _check_built(config, chosen, llm_and_tokenizer or load_llm_stand_in(config.model.llm))


def model_tensor_names(built: Dict[str, Any]) -> Optional[set]:
    """The names of the tensors a checkpoint of this model holds in ``model.safetensors`` (as
    ``checkpoints.trainable_state`` names them), from the components ``check_config_components`` built;
    None when it did not build every kind the model holds."""
    if any(kind.name not in built for kind in MODEL_KINDS):
        return None
    return {"doc_vectors"} | {f"{kind.model_attribute}.{name}" for kind in MODEL_KINDS
                              for name in built[kind.name].state_dict()}


def _check_built(config, chosen, llm_and_tokenizer) -> Dict[str, Any]:
    """Check the components of ``chosen`` kinds as ``config`` names them, and return them built: the
    projection first (its ``key_dims`` sizes the query encoder and the selector), a write objective on
    a small model made of them."""
    from pqa_core.modeling.builder import component_kwargs, key_context, model_context

    llm, tokenizer = llm_and_tokenizer
    context = model_context(config, llm, tokenizer)
    built = {"projection": check_component("projection", config.projection["name"],
                                           component_kwargs(config.projection), context)}
    keyed = key_context(context, built["projection"])
    for kind in sorted(chosen, key=lambda k: k.name == "write_objective"):  # after the model's parts
        if kind.name in built:
            continue
        if kind.name == "write_objective":
            keyed = {**keyed, "model": _small_model(llm, tokenizer, context, built)}
        section = getattr(config, kind.name)
        built[kind.name] = check_component(kind.name, section["name"], component_kwargs(section), keyed)
    return built


def _small_model(llm, tokenizer, context, built):
    """A ParametricQA of four documents on the stand-in LLM, from the components already checked."""
    from pqa_core.modeling.model import ParametricQA

    llm.requires_grad_(False)
    with _isolated_rng():
        torch.manual_seed(0)
        doc_init = torch.randn(len(PROBE_TEXTS), context["d_z"]) * context["input_std"]
        return ParametricQA(llm, tokenizer, len(PROBE_TEXTS), context["d_z"], built["query_encoder"],
                            built["selector"], built["projection"], doc_init)


def check_in_default_run(kind: str, name: str, kwargs: Optional[Mapping[str, Any]] = None, llm: str = "tiny",
                         llm_and_tokenizer=None):
    """The contract of one component as a run that changes only it would build it (``pqa plugins
    check``, ``pqa_core.testing``): on a stand-in of ``llm``, beside the default components it needs.
    Returns it built."""
    from pqa_core.config import PQAConfig
    from pqa_core.modeling.llm import load_llm_stand_in

    component = plugins.validate(kind, name, kwargs)
    sized_by_projection = kind == "projection" and hasattr(component.factory, "needed_d_z")
    config = PQAConfig.from_dict({"model": {"llm": llm, **({"d_z": 0} if sized_by_projection else {})},
                                  kind: {"name": name, **dict(kwargs or {})}})
    needed = {"projection", kind} | ({"query_encoder", "selector"} if kind == "write_objective" else set())
    return _check_built(config, [KIND[k] for k in needed], llm_and_tokenizer or load_llm_stand_in(llm))[kind]
