"""Model families: one adapter per family (or per kind of family), behind :class:`MoEAdapter`.

``base`` holds the interface and the registry; ``switch`` (Switch Transformers), ``bert`` (upcycled
BERT MoE/MEO classifiers) and ``decoder`` (every decoder family with a router and an experts
module, described as data in ``catalog``) register their adapters. Router semantics (how logits
become a choice of experts) live in ``routers`` and expert weight layouts in ``layouts``, apart
from where the weights sit in a model.
"""

from pipeline.families import bert, catalog, switch  # noqa: F401  (each registers its adapters)
from pipeline.families.base import (
    ADAPTERS,
    ModelStructureError,
    MoEAdapter,
    SparseLayer,
    adapter_for,
    module_param_counts,
    set_submodule,
)

__all__ = [
    "ADAPTERS",
    "ModelStructureError",
    "MoEAdapter",
    "SparseLayer",
    "adapter_for",
    "module_param_counts",
    "set_submodule",
]
