"""A student in and out of open_clip's format: the export, its model card, and starting from pretrained weights.

One job per module:

- `export`      `clip-ping export`: a checkpoint as an open_clip / Hugging Face hub model folder
- `model_card`  the README.md of that folder
- `pretrained`  `--init-from`: a student started from open_clip weights (a file, a folder or the hub)

The public names are re-exported here, so ``from clip_ping.hub import X`` works.
"""

from .export import ExportConfig, export_open_clip, portable_model_config, verify_export
from .model_card import model_card
from .pretrained import InitSource, init_student, is_remote

__all__ = ["ExportConfig", "InitSource", "export_open_clip", "init_student", "is_remote", "model_card",
           "portable_model_config", "verify_export"]
