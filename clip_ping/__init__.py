"""clip-ping: train lightweight CLIP models with CLIP-PING (nearest-neighbour guidance).

Pipeline, one module each:
    data -> teachers and banks -> neighbours -> student and losses -> trainer -> evaluation and reports
"""

__version__ = "0.1.0"

# The stable Python API (clip_ping.api): the pipeline's stages as functions. `neighbors` and
# `export` are there too; at the top level those names are the stages' modules.
from .api import evaluate, extract, train  # noqa: E402

__all__ = ["__version__", "evaluate", "extract", "train"]
