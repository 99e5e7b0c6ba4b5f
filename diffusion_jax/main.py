r"""Entry point: ``python -m diffusion_jax.main --config=configs/X.py --workdir=DIR [--mode=...]``.

This file is intentionally kept short: flags, the multi-process runtime, then one call into
``diffusion_jax.training``. ``--config.a.b=value`` overrides any config field. Modes: ``train``
(resumes from the workdir's latest checkpoint), ``sample`` (EMA samples to ``workdir/samples``),
``eval`` (bits/dim on ``data.eval_split``), ``img2img`` / ``inpaint`` / ``invert`` (edits of
``--config.sampling.image``, written to ``workdir/samples``), ``txt2img`` (images from the
pretrained diffusers-format directory ``--config.pretrained`` for ``--config.sampling.prompt``;
with ``pretrained`` set, ``img2img`` and ``inpaint`` edit through that pipeline too).

Multi-host: on a TPU pod every host runs the same command and ``jax.distributed`` finds its peers;
on GPU clusters pass ``--coordinator_address=host:port --num_processes=N --process_id=i``.
"""

import functools
import logging as std_logging  # the records' levels; absl's logging.WARNING is -1
import os
import socket
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (e.g. configs/tiny.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'img2img', 'inpaint',
                                            'invert', 'txt2img'], 'What to do.')
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
_VERBOSE = flags.DEFINE_boolean('verbose', False,
                                'Show the full traceback of errors a user causes (config, paths, '
                                'checkpoints, a diverged run) instead of one line.')
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


def _is_missing_libtpu_probe(record) -> bool:
  """Whether ``record`` is JAX's probe of the TPU backend failing because libtpu is not installed.

  Without ``JAX_PLATFORMS`` JAX tries every backend it knows and logs each failure at INFO, so
  every run on a CPU or GPU host began with ``Unable to initialize backend 'tpu': ... Failed to
  open libtpu.so``. Only that case is dropped: a TPU whose libtpu fails to start logs another
  error, a TPU VM without libtpu gets JAX's own warning, and a backend named in ``JAX_PLATFORMS``
  that fails raises.
  """
  if not record.name.startswith('jax.') or record.levelno >= std_logging.WARNING:
    return False
  message = record.getMessage()
  return (message.startswith("Unable to initialize backend 'tpu'")
          and 'libtpu.so: cannot open shared object file' in message)


class _QuietLibraries:
  """Drops INFO chatter from the console: orbax, grain and etils (a line per save) and JAX's TPU
  probe on hosts without libtpu (``_is_missing_libtpu_probe``); warnings and errors stay."""

  def filter(self, record) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    noisy = any(lib in record.pathname for lib in ('/orbax/', '/grain/', '/etils/'))
    return not noisy and not _is_missing_libtpu_probe(record)


def _check_workdir(workdir: str, mode: str, *, pretrained: bool = False) -> bool:
  """Checks ``workdir`` before anything is compiled or created; returns whether it has checkpoints.

  Raises:
    NotADirectoryError: ``workdir`` is an existing file.
    FileNotFoundError: ``--mode=sample`` / ``--mode=eval`` and ``workdir/checkpoints`` holds no
      step (nothing would be read, and failing later would leave directories behind).
  """
  from etils import epath  # pylint: disable=import-outside-toplevel
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f'--workdir={workdir} is a file, not a directory: give a new or an '
                             'existing run directory.')
  ckpts = path / 'checkpoints'
  has_checkpoints = ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())
  if mode not in ('train', 'txt2img') and not pretrained and not has_checkpoints:
    raise FileNotFoundError(f'No checkpoint in {ckpts} for --mode={mode}: train first with '
                            f'--mode=train and --workdir={workdir}.')
  return has_checkpoints


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    config = _CONFIG.value
    config.keys()  # config_flags reports a file it could not load only when the config is read
  except OSError as e:
    raise FileNotFoundError(f'--config: {e.__cause__ or e}') from e
  if _MODE.value in ('img2img', 'inpaint', 'invert'):  # their inputs first: nothing is created
    from diffusion_jax.training import inference  # pylint: disable=import-outside-toplevel
    inference.check_edit_inputs(config, _MODE.value)
  # img2img / inpaint with --config.pretrained edit through a Stable Diffusion pipeline.
  pretrained = _MODE.value == 'txt2img' or (_MODE.value in ('img2img', 'inpaint')
                                            and bool(config.pretrained))
  if pretrained:
    from diffusion_jax.training import txt2img  # pylint: disable=import-outside-toplevel
    txt2img.check_inputs(config)
  # The two-stage latent job keeps its diffusion checkpoints in WORKDIR/ldm.
  checked = (os.path.join(_WORKDIR.value, 'ldm') if _MODE.value != 'train'
             and config.training.task == 'ldm' else _WORKDIR.value)
  _check_workdir(checked, _MODE.value, pretrained=pretrained)  # a bad path fails fast
  import jax  # pylint: disable=import-outside-toplevel
  from diffusion_jax import cpu_runtime, training  # pylint: disable=import-outside-toplevel
  _init_distributed()
  applied = cpu_runtime.configure()  # after jax.distributed, before any computation
  if not pretrained:  # a pipeline reads only pretrained and sampling.* (checked above)
    training.validate_config(config)  # a config error before the first line of output
  # Set only now: every path is checked, so a run that fails before it starts leaves no
  # .jax_cache behind (sample/eval got here only with a checkpoint in the workdir).
  cache = config.training.compilation_cache_dir or os.path.join(_WORKDIR.value, '.jax_cache')
  jax.config.update('jax_compilation_cache_dir', cache)
  logging.info('JAX %s, process %d/%d, devices: %s', jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  if applied:
    logging.info('CPU runtime settings (diffusion_jax.cpu_runtime): %s', ', '.join(applied))
  from diffusion_jax.training import inference  # pylint: disable=import-outside-toplevel,reimported
  run = {'train': training.train_and_evaluate, 'sample': training.sample,
         'eval': training.evaluate, 'img2img': inference.img2img, 'inpaint': inference.inpaint,
         'invert': inference.invert, 'txt2img': _txt2img}[_MODE.value]
  if pretrained:
    run = functools.partial(_txt2img, mode=_MODE.value)
  elif _MODE.value == 'sample' and config.training.task in LATENT_TASKS:
    from diffusion_jax.training import latent  # pylint: disable=import-outside-toplevel
    run = latent.sample_text
  run(config, _WORKDIR.value)


def _txt2img(config, workdir, mode='txt2img'):
  from diffusion_jax.training import txt2img  # pylint: disable=import-outside-toplevel
  return txt2img.text_to_image(config, workdir, mode=mode)


# Training tasks whose --mode=sample is text-to-image from prompts (training/latent.py).
LATENT_TASKS = ('ldm', 'latent_diffusion')


# The errors that our own checks raise for something the user can fix: one line, no traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError)


def _config_field_error(e: AttributeError, argv: list[str]) -> str:
  """One readable line for ml_collections' error on a misspelled ``--config.a.b`` override."""
  inner = e.args[0] if e.args else e  # ml_collections wraps a KeyError('name\nDid you mean ...')
  message = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
  name, _, hint = str(message).partition('\n')
  name = name.strip("'\"")
  given = [a.split('=', 1)[0] for a in argv if a.startswith('--config.') and name in a]
  where = given[0] if given else f'--config.{name}'
  return f'{where}: the config has no field {name!r}. {hint}'.strip()


def run(argv: list[str] | None = None) -> None:
  """``app.run(main)``, with user errors printed as ``error: <message>`` and exit code 1."""
  from diffusion_jax import checkpointing  # pylint: disable=import-outside-toplevel
  argv = sys.argv if argv is None else argv
  try:
    app.run(main, argv=argv)
  except (*_USER_ERRORS, AttributeError, checkpointing.CheckpointCorruptedError) as e:
    # --verbose may not be parsed yet: a misspelled field fails while the flags are read.
    if '--verbose' in argv or (flags.FLAGS.is_parsed() and _VERBOSE.value):
      raise
    if isinstance(e, AttributeError):
      if not (e.args and isinstance(e.args[0], KeyError) and not flags.FLAGS.is_parsed()):
        raise  # not a misspelled --config override: a bug, keep its traceback
      message = _config_field_error(e, argv)
    else:
      message = ' '.join(str(e).split())
    print(f'error: {message}', file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  run()
