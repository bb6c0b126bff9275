"""Built-in projections: doc latent ``z [..., d_z]`` -> ``num_tokens`` soft-prompt embeddings ``[..., num_tokens, d_model]``.

Initialisation: the soft tokens should look like the LLM's real token
embeddings in scale, so weights are drawn such that the output's std is about
``embedding_std`` (the std of the LLM's input embedding weights) when ``z``'s
coordinates have std ``input_std``. Biases start at zero.

``input_std`` is supplied by the model: the measured std of the initial doc
vectors (``randn * embedding_std`` for random init, about ``1/sqrt(d_z)`` for
unit-norm MiniLM init). Built alone, it defaults to ``embedding_std``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pqa_core.hookspecs import hookimpl
from pqa_core.interfaces import Projection

DEFAULT_EMBEDDING_STD = 0.02
GELU_SECOND_MOMENT = 0.425  # E[gelu(x)^2] for x ~ N(0, 1)


def _scales(name: str, d_z: int, d_model: int, num_tokens: int, embedding_std: Optional[float],
            input_std: Optional[float]):
    """Validate sizes; return (target output std, expected input std)."""
    if d_z < 1 or d_model < 1 or num_tokens < 1:
        raise ValueError(f"{name} projection: d_z, d_model and num_tokens must be >= 1, "
                         f"got {d_z}, {d_model}, {num_tokens}")
    target = DEFAULT_EMBEDDING_STD if embedding_std is None else float(embedding_std)
    source = target if input_std is None else float(input_std)
    if not (target > 0 and source > 0):
        raise ValueError(f"{name} projection: embedding_std and input_std must be > 0, "
                         f"got {embedding_std}, {input_std}")
    return target, source


class _ProjectionBase(Projection):
    def _reshape(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.view(*flat.shape[:-1], self.num_tokens, self.d_model)

    def _check_input(self, z: torch.Tensor):
        if z.shape[-1] != self.d_z:
            raise ValueError(f"projection built for d_z={self.d_z}, got z of shape {tuple(z.shape)}")

    def extra_repr(self) -> str:
        return f"d_z={self.d_z}, num_tokens={self.num_tokens}, d_model={self.d_model}"


class LinearProjection(_ProjectionBase):
    """``Linear(d_z, num_tokens * d_model)``, reshaped to ``[..., num_tokens, d_model]``."""

    def __init__(self, d_z: int, d_model: int, num_tokens: int, embedding_std: Optional[float] = None,
                 input_std: Optional[float] = None):
        super().__init__()
        target, input_std = _scales("linear", d_z, d_model, num_tokens, embedding_std, input_std)
        self.d_z, self.d_model, self.num_tokens = int(d_z), int(d_model), int(num_tokens)
        self.proj = nn.Linear(self.d_z, self.num_tokens * self.d_model)
        nn.init.normal_(self.proj.weight, std=target / (input_std * math.sqrt(self.d_z)))
        nn.init.zeros_(self.proj.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        return self._reshape(self.proj(z))


class MLP2xGeluProjection(_ProjectionBase):
    """xRAG's projector: ``Linear(d_z, hidden) -> GELU -> Linear(hidden, num_tokens * d_model)``,
    ``hidden`` defaulting to ``d_model``."""

    def __init__(self, d_z: int, d_model: int, num_tokens: int, embedding_std: Optional[float] = None,
                 hidden: Optional[int] = None, input_std: Optional[float] = None):
        super().__init__()
        target, input_std = _scales("mlp2x_gelu", d_z, d_model, num_tokens, embedding_std, input_std)
        self.d_z, self.d_model, self.num_tokens = int(d_z), int(d_model), int(num_tokens)
        self.hidden = self.d_model if hidden is None else int(hidden)
        if self.hidden < 1:
            raise ValueError(f"mlp2x_gelu projection: hidden must be >= 1, got {hidden}")
        self.fc1 = nn.Linear(self.d_z, self.hidden)
        self.fc2 = nn.Linear(self.hidden, self.num_tokens * self.d_model)
        # pre-activations ~ N(0, 1); then scale the second layer to the target std
        nn.init.normal_(self.fc1.weight, std=1.0 / (input_std * math.sqrt(self.d_z)))
        nn.init.zeros_(self.fc1.bias)
        nn.init.normal_(self.fc2.weight, std=target / math.sqrt(self.hidden * GELU_SECOND_MOMENT))
        nn.init.zeros_(self.fc2.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        return self._reshape(self.fc2(F.gelu(self.fc1(z))))


class DirectProjection(_ProjectionBase):
    """No shared map: ``z`` *is* the soft prompt, ``d_z = num_tokens * d_model`` floats reshaped.

    The setting of the Cramming paper (free memory embeddings per document): the most
    capacity per document a soft prompt of ``num_tokens`` can hold, at the price of
    ``num_tokens * d_model`` floats per document and no MiniLM initialisation (use
    ``model.doc_init=random``, which draws z at the LLM's embedding scale; ``model.d_z=0`` sets the size).
    """

    def __init__(self, d_z: int, d_model: int, num_tokens: int):
        super().__init__()
        _scales("direct", d_z, d_model, num_tokens, None, None)
        self.d_z, self.d_model, self.num_tokens = int(d_z), int(d_model), int(num_tokens)
        if self.d_z != self.num_tokens * self.d_model:
            raise ValueError(f"direct projection needs model.d_z = num_memory_tokens x d_model = "
                             f"{self.num_tokens} x {self.d_model} = {self.num_tokens * self.d_model}, got {self.d_z}")

    @staticmethod
    def needed_d_z(d_model: int, num_tokens: int, **_) -> int:
        """The ``model.d_z`` this projection takes (used when the config says ``model.d_z=0``)."""
        return int(num_tokens) * int(d_model)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        return self._reshape(z)


class HybridProjection(_ProjectionBase):
    """z = [retrieval key (``key_dims``) | free content (``num_tokens * d_model``)];
    soft prompt = ``mlp2x_gelu(key) + free``.

    Why: through a 384-float z and a map shared by all documents, the write phase converges
    slowly, and the updates it makes to z move the vectors the selector scores, so retrieval
    learnt from MiniLM is lost (bench/RESULTS.md (a), (f)). Here the key starts as the MiniLM
    embedding and gives every document a sensible first soft prompt through the map; the free
    part (zero at the start) holds what that map cannot, as in the ``direct`` setting. With
    ``detach_key`` (default) the generation loss never moves the key: only the retrieval loss
    of the read phase does, so the write phase leaves retrieval as it found it. By default
    (``key_in_prompt=False``) the soft tokens are the free part alone (started from the document's
    salient word embeddings, ``model.content_init=keywords``) and the key serves retrieval only: the
    measured best reader input (bench/RESULTS.md (a)); ``key_in_prompt=True`` adds the mapped key.
    ``model.d_z`` must be ``key_dims + num_memory_tokens x d_model`` (``model.d_z=0`` sets it).
    """

    def __init__(self, d_z: int, d_model: int, num_tokens: int, embedding_std: Optional[float] = None,
                 input_std: Optional[float] = None, key_dims: int = 384, hidden: Optional[int] = None,
                 detach_key: bool = True, key_in_prompt: bool = False):
        super().__init__()
        _scales("hybrid", d_z, d_model, num_tokens, embedding_std, input_std)
        self.d_z, self.d_model, self.num_tokens = int(d_z), int(d_model), int(num_tokens)
        self.key_dims, self.detach_key, self.key_in_prompt = int(key_dims), bool(detach_key), bool(key_in_prompt)
        needed = self.key_dims + self.num_tokens * self.d_model
        if self.key_dims < 1 or self.d_z != needed:
            raise ValueError(f"hybrid projection needs model.d_z = key_dims + num_memory_tokens x d_model = "
                             f"{self.key_dims} + {self.num_tokens} x {self.d_model} = {needed}, got {self.d_z}")
        self.key_map = MLP2xGeluProjection(self.key_dims, d_model, num_tokens, embedding_std, hidden, input_std)

    @staticmethod
    def needed_d_z(d_model: int, num_tokens: int, key_dims: int = 384, **_) -> int:
        """The ``model.d_z`` this projection takes (used when the config says ``model.d_z=0``)."""
        return int(key_dims) + int(num_tokens) * int(d_model)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        key, free = z[..., :self.key_dims], z[..., self.key_dims:]
        if not self.key_in_prompt:  # the key only retrieves; the soft tokens are the free part alone
            return self._reshape(free)
        if self.detach_key:
            key = key.detach()
        return self.key_map(key) + self._reshape(free)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", key_dims={self.key_dims}, detach_key={self.detach_key}"


@hookimpl
def pqa_register_projections(register):
    register("linear", LinearProjection)
    register("mlp2x_gelu", MLP2xGeluProjection)
    register("direct", DirectProjection)
    register("hybrid", HybridProjection)
