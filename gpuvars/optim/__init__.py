"""Optimizers whose updates run on each variable's device (``gv.optim``).

``SGD``, ``Adam``, ``AdamW``, ``RMSprop``, ``Adagrad`` with Keras 3's names and defaults;
slots are co-located ``gv.Variable``s checkpointed by name; learning-rate schedules;
``clip_by_global_norm``. See :class:`gpuvars.optim.Optimizer`.
"""

from gpuvars.optim._optimizers import SGD, Adagrad, Adam, AdamW, RMSprop
from gpuvars.optim.optimizer import Optimizer, clip_by_global_norm
from gpuvars.optim.schedules import CosineDecay, ExponentialDecay, LearningRateSchedule

__all__ = [
    "SGD",
    "Adagrad",
    "Adam",
    "AdamW",
    "CosineDecay",
    "ExponentialDecay",
    "LearningRateSchedule",
    "Optimizer",
    "RMSprop",
    "clip_by_global_norm",
]
