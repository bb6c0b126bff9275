"""Whether something computed from tensors is still up to date: a stamp of the tensors' identity,
storage and version counters.

Every in-place change (an optimizer step, ``load_state_dict``, ``copy_``) bumps a tensor's version
counter, so a stamp taken when a cache or an index was built differs from one taken after any change.
A weak reference to each tensor's base guards against a freed tensor whose memory (address and
version 0) a new one reuses.
"""
from __future__ import annotations

import weakref
from typing import Iterable, Optional

import torch


def _key(tensor: torch.Tensor) -> tuple:
    return (tensor.data_ptr(), tensor._version, tuple(tensor.shape), tensor.stride(), tensor.storage_offset(),
            tensor.dtype, tensor.device)


class Stamp:
    """A snapshot of ``tensors``; ``stamp.matches(tensors)`` is True while none of them changed."""

    def __init__(self, tensors: Iterable[torch.Tensor]):
        tensors = list(tensors)
        self._refs = [weakref.ref(t._base if t._base is not None else t) for t in tensors]
        self._keys = [_key(t) for t in tensors]

    @classmethod
    def of(cls, tensors: Iterable[torch.Tensor]) -> Optional["Stamp"]:
        """A stamp, or None when one cannot be taken (inference-mode tensors have no version counter)."""
        try:
            return cls(tensors)
        except RuntimeError:
            return None

    def matches(self, tensors: Iterable[torch.Tensor]) -> bool:
        tensors = list(tensors)
        if len(tensors) != len(self._keys):
            return False
        try:
            for ref, key, tensor in zip(self._refs, self._keys, tensors):
                base = tensor._base if tensor._base is not None else tensor
                if ref() is not base or _key(tensor) != key:
                    return False
        except RuntimeError:  # an inference-mode tensor: nothing to compare
            return False
        return True
