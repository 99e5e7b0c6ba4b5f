"""Orchestration: build everything from the config, then train, sample or evaluate.

``train_and_evaluate(config, workdir)`` is the whole training job as a function (for notebooks);
``main.py`` only parses flags and calls it, ``sample`` or ``evaluate``. The ConfigDict stops in
this package: everything below it takes typed arguments.

One concern per module:

- ``config``: validation against ``diffusion_jax/configs/default.py``; process, network,
  optimizer, objective and sampler options built from the config.
- ``builders``: data pipeline, mesh, sharded state (fresh, from init params or restored), task.
- ``state``: ``TrainState``; ``step``: the pure ``train_step`` / ``train_steps``.
- ``loop``: ``train_and_evaluate``; ``preemption``: SIGTERM handling on one process or many.
- ``inference``: ``sample`` (``--mode=sample``); ``evaluation``: ``evaluate`` (``--mode=eval``).
"""

from diffusion_jax.training.config import validate_config
from diffusion_jax.training.evaluation import evaluate
from diffusion_jax.training.inference import sample
from diffusion_jax.training.loop import train_and_evaluate

__all__ = ['evaluate', 'sample', 'train_and_evaluate', 'validate_config']
