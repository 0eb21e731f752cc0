"""clip-ping: train lightweight CLIP models with CLIP-PING (nearest-neighbour guidance).

Pipeline, one module each:
    data -> teachers and banks -> neighbours -> student and losses -> trainer -> evaluation and reports
"""

__version__ = "0.1.0"
