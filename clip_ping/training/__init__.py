"""Stage 2: training a student (`clip-ping train`).

One job per module:

- `train_config`  `TrainConfig`: the options of a run, checked when made
- `trainer`       the loop: data, objective, optimiser, precision, processes
- `checkpoints`   checkpoint files that are never half-written; resuming
- `run_folder`    what a run folder holds, and when one may be reused
- `run_logs`      where metrics go (JSON lines, TensorBoard, W&B)
- `schedule`      the learning-rate schedule

The public names are re-exported here, so ``from clip_ping.training import X`` works.
"""

from .checkpoints import load_checkpoint, resolve_resume, save_checkpoint
from .run_logs import SINKS, RunLogs, parse_log_to
from .schedule import warmup_cosine_lr
from .train_config import DEFAULT_LAMBDA, TrainConfig, comparable_options
from .trainer import MAX_LOGIT_SCALE, StepResult, Trainer, TrainingDiverged, parameter_groups, train

__all__ = [
    "DEFAULT_LAMBDA", "MAX_LOGIT_SCALE", "SINKS", "RunLogs", "StepResult", "TrainConfig", "Trainer", "TrainingDiverged",
    "comparable_options", "load_checkpoint", "parameter_groups", "parse_log_to", "resolve_resume", "save_checkpoint",
    "train", "warmup_cosine_lr",
]
