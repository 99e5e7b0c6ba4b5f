r"""Entry point: ``python -m diffusion_jax.main --config=configs/X.py --workdir=DIR [--mode=...]``.

This file is intentionally kept short: flags, the multi-process runtime, then one call into
``diffusion_jax.training``. ``--config.a.b=value`` overrides any config field. Modes: ``train``
(resumes from the workdir's latest checkpoint), ``sample`` (EMA samples to ``workdir/samples``),
``eval`` (bits/dim on ``data.eval_split``).

Multi-host: on a TPU pod every host runs the same command and ``jax.distributed`` finds its peers;
on GPU clusters pass ``--coordinator_address=host:port --num_processes=N --process_id=i``.
"""

import os
import socket
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (e.g. configs/tiny.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval'], 'What to do.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for multi-process GPU/CPU runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index.')
_INIT_TIMEOUT = flags.DEFINE_integer('initialization_timeout', 300,
                                     'Seconds to wait for every process to reach the coordinator.')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout', 100, 'Seconds without a heartbeat after which jax.distributed declares a '
    'process dead and stops the job (raise it on hosts so loaded that a long compile starves the '
    'heartbeat threads).')
flags.mark_flags_as_required(['config', 'workdir'])


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once ``address`` accepts TCP connections; exits with a clear message after timeout_s.

  ``jax.distributed.initialize`` does not raise when the coordinator cannot be reached: the C++
  client aborts the whole process (SIGABRT and a stack trace), so a wrong address or port is checked
  here first, by the processes that are not the coordinator themselves.
  """
  host, port = address.rsplit(':', 1)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=5):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise SystemExit(
            f'Could not reach the coordinator at --coordinator_address={address} (process 0) '
            f'within --initialization_timeout={timeout_s:g}s: {e}. Check that process 0 runs with '
            'the same address and port and that this machine can reach it.') from e
      time.sleep(0.5)


def _init_distributed() -> None:
  import jax  # pylint: disable=import-outside-toplevel
  if _COORDINATOR.value:
    if _PROCESS_ID.value:  # process 0 starts the coordinator service itself
      _wait_for_coordinator(_COORDINATOR.value, _INIT_TIMEOUT.value)
    try:
      jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                 num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                                 initialization_timeout=_INIT_TIMEOUT.value,
                                 heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
    except Exception as e:  # pylint: disable=broad-except
      raise SystemExit(
          f'Could not join the job at --coordinator_address={_COORDINATOR.value} as process '
          f'{_PROCESS_ID.value} of {_NUM_PROCESSES.value} within {_INIT_TIMEOUT.value}s: {e}\n'
          'Check that process 0 runs with the same address and port and that it is reachable.'
      ) from e
  elif os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    jax.distributed.initialize()  # a TPU pod: JAX finds the coordinator itself


class _QuietLibraries:
  """Drops the INFO chatter of orbax and grain (a line per save) from the console; warnings stay."""

  def filter(self, record) -> bool:
    noisy = any(lib in record.pathname for lib in ('/orbax/', '/grain/', '/etils/'))
    return record.levelno >= 30 or not noisy


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax  # pylint: disable=import-outside-toplevel
  from diffusion_jax import cpu_runtime, training  # pylint: disable=import-outside-toplevel
  _init_distributed()
  applied = cpu_runtime.configure()  # after jax.distributed, before any computation
  config = _CONFIG.value
  cache = config.training.compilation_cache_dir or os.path.join(_WORKDIR.value, '.jax_cache')
  jax.config.update('jax_compilation_cache_dir', cache)
  logging.info('JAX %s, process %d/%d, devices: %s', jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  if applied:
    logging.info('CPU runtime settings (diffusion_jax.cpu_runtime): %s', ', '.join(applied))
  run = {'train': training.train_and_evaluate, 'sample': training.sample,
         'eval': training.evaluate}[_MODE.value]
  run(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
