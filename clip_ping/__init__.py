"""clip-ping: train lightweight CLIP models with CLIP-PING (nearest-neighbour guidance).

Pipeline, one module each:
    data -> teachers and banks -> neighbours -> student and losses -> trainer -> evaluation and reports
"""

__version__ = "0.1.0"

# The stable Python API (clip_ping.api): the pipeline's stages as functions, one per command.
from .api import evaluate, export, extract, neighbors, train  # noqa: E402

__all__ = ["__version__", "evaluate", "export", "extract", "neighbors", "train"]
