"""The student and what trains it: the dual encoder, the teacher-to-student heads and the losses.

One job per module:

- `student`  open_clip students built from ``model_configs/*.json``; loading a checkpoint or an export
- `heads`    the heads h_A, h_B that map teacher features into the student's space
- `losses`   CLIP + NN + XNN InfoNCE, and the peer methods' terms

The public names are re-exported here, so ``from clip_ping.model import X`` works.
"""

from .heads import NeighborGuidance
from .losses import DUPLICATE_RULES, ClipPingLoss, info_nce, nt_xent, one_way_nce, relational_kl
from .student import (
    MODEL_CONFIG_DIR,
    StudentEncoders,
    create_student,
    embed_dim,
    enable_grad_checkpointing,
    load_checkpoint_file,
    load_export,
    load_student,
    nonfinite_tensors,
    register_model_configs,
    shipped_models,
)

__all__ = [
    "DUPLICATE_RULES", "MODEL_CONFIG_DIR", "ClipPingLoss", "NeighborGuidance", "StudentEncoders",
    "create_student", "embed_dim", "enable_grad_checkpointing", "info_nce", "load_checkpoint_file", "load_export",
    "load_student", "nonfinite_tensors", "nt_xent", "one_way_nce", "register_model_configs", "relational_kl",
    "shipped_models",
]
