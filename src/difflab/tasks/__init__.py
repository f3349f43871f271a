"""Training objectives ("tasks") of the one training loop (:mod:`difflab.training`).

Each task is a module with a settings dataclass and a :class:`~difflab.training.task.Task` subclass; adding an
objective is one new module plus a line in :data:`TASKS`, which gives it a ``difflab`` command (the key) with
one flag per setting, resume, torchrun, EMA, interrupts and checkpoints.
"""

from difflab.tasks.diffusion import DiffusionConfig, DiffusionTask, train
from difflab.tasks.distill import DistillConfig, DistillTask, distill
from difflab.tasks.noisy_classifier import NoisyClassifierConfig, NoisyClassifierTask, train_classifier
from difflab.tasks.vae import VAEConfig, VAETask, train_vae

# command name -> task
TASKS = {
    "train": DiffusionTask,
    "train-classifier": NoisyClassifierTask,
    "train-vae": VAETask,
    "distill": DistillTask,
}

__all__ = ["TASKS", "DiffusionConfig", "DiffusionTask", "DistillConfig", "DistillTask", "distill",
           "NoisyClassifierConfig", "NoisyClassifierTask", "VAEConfig",
           "VAETask", "train", "train_classifier", "train_vae"]
