"""A complete pqa plugin: one selector, registered through the ``pqa`` entry point group."""
import torch

from pqa_core.hookspecs import hookimpl
from pqa_core.interfaces import Selector


class L2Selector(Selector):
    """Score = -||q - z||^2 / temperature: nearest documents first."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, query_vectors: torch.Tensor, doc_vectors: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(query_vectors, doc_vectors).pow(2) / self.temperature


@hookimpl
def pqa_register_selectors(register):
    register("l2", L2Selector)
