"""MC-SMoE / MEO expert merging pipeline: the library behind the DVC stages in ``stages/``."""

__version__ = "0.1.0"
