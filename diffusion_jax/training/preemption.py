"""SIGTERM -> save at the next step boundary and exit cleanly, on one process or many."""

from __future__ import annotations

import signal

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preemption:
  """A context manager the training loop asks, after each step, whether to save and stop.

  One process: a Python SIGTERM handler sets a flag that ``reached`` returns. Several processes:
  JAX's preemption sync manager (started by ``jax.distributed.initialize``) catches SIGTERM
  itself, spreads the notice to every process and names one common step;
  ``multihost_utils.reached_preemption_sync_point`` is True on every process at that step. It
  costs no communication until a notice arrives, so it is called every step.

  Example::

    with Preemption() as preemption:
      while step < total:
        ...
        if preemption.reached(step):
          save(state, step)
          break
  """

  def __init__(self):
    self.requested = False
    self._old = None
    self._multi = jax.process_count() > 1
    self._warned = False

  def __enter__(self) -> 'Preemption':
    def handler(signum, frame):
      del signum, frame
      self.requested = True
    if self._multi:
      return self  # leave SIGTERM to JAX's preemption notifier
    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def reached(self, step: int) -> bool:
    """True once a preemption notice has arrived (on every process at the same ``step``)."""
    if not self._multi:
      return self.requested
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as e:  # no preemption service: SIGTERM then ends the job unsaved
      if not self._warned:
        logging.warning('No preemption sync manager (%s); SIGTERM will not save a checkpoint.', e)
        self._warned = True
      return False
