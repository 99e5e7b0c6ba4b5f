"""Saving and restoring the training state and the data iterator state with orbax.

One `Checkpointer` wraps an `orbax.checkpoint.CheckpointManager` over `<workdir>/checkpoints`. Each
step directory holds three items:

- `state`: the pytree leaves of the `TrainState` (step, params, ema_params, opt_state), written with
  `StandardSave` as `flax.serialization.to_state_dict(state)`, so the layout is plain nested dicts
  keyed by parameter names (`params/Dense_0/kernel`) and independent of Python class names. Static
  fields (`apply_fn`, `tx`) are not saved; `restore` takes them from `abstract_state`.
- `data`: the data iterator state as JSON (`JsonSave`); `bytes` values are stored base64-encoded.
- `integrity`: JSON with a 32-bit fingerprint of every array, computed on device when saving and
  checked after restoring, so silently corrupted data (a flipped byte inside a compressed chunk,
  which tensorstore reads back without complaint) is caught.

Guarantees:

- Atomic writes. On local and POSIX filesystems orbax writes a step to
  `<step>.orbax-checkpoint-tmp-<timestamp>` and renames it to `<step>` only once every item is
  written (`AtomicRenameTemporaryPath`); on GCS, where rename is not atomic, a step only counts once
  its `commit_success.txt` exists (`CommitFileTemporaryPath`). A crash mid-save leaves a temporary
  directory that is never listed as a step.
- Corruption is detected on restore: unreadable metadata, a missing or truncated file, or a
  fingerprint mismatch. The step is reported with its path (absl warning) and the previous step is
  tried; corrupted steps newer than the one restored are renamed to `<step>.corrupt-<time>` (kept
  for inspection, no longer listed) so training can save those step numbers again. If no step is
  good, `CheckpointCorruptedError` lists every path and reason. Explicitly requested steps
  (`restore(..., step=n)`) never fall back.
- Retention (`max_to_keep`) never deletes the newest checkpoint known to be good (one this object
  saved and saw committed, or restored), even when the save that follows it fails in the background.
- Restoring into a model of different shapes raises `ValueError` naming the first mismatching
  parameter, checked against the checkpoint's metadata before any array is read.
- `save` refuses (returns False, logs an error) a state whose params or EMA params are not finite.
- Nothing is unpickled: orbax's array and JSON handlers read tensorstore data and JSON only.

Multi-process: every process calls every method; orbax coordinates (process 0 writes the
metadata and renames, all processes write their own shards).

Example::

    ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=3)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(init_fn, key), shardings)
    restored = ckpt.restore(abstract)
    if restored is not None:
      state, data_state, step = restored
    ...
    ckpt.save(step, state, data_state=iterator.get_state())
    ...
    ckpt.close()
"""

import base64
from collections.abc import Mapping
import os
import time
from typing import Any

from absl import logging
from etils import epath
import flax.serialization
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

PyTree = Any

_STATE = 'state'
_DATA = 'data'
_INTEGRITY = 'integrity'
_BYTES_TAG = '__bytes_base64__'
_FORMAT_VERSION = 1
_FIX_SHAPES = ('Use the config the checkpoint was trained with, or a fresh --workdir to train '
               'this model from scratch.')


class CheckpointCorruptedError(RuntimeError):
  """No checkpoint step in the directory could be restored."""


class _Corrupt(Exception):
  """A step's files are missing, unreadable or do not match their fingerprints."""


def _short(e: Exception, limit: int = 300) -> str:
  """First `limit` characters of an error on one line (tensorstore errors run to pages)."""
  text = str(e).replace('\n', ' ')
  return text if len(text) <= limit else text[:limit] + '...'


def _key_str(entry) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _path_str(path) -> str:
  return '/'.join(_key_str(k) for k in path)


def _flatten(tree: PyTree) -> dict[str, Any]:
  """`{'params/Dense_0/kernel': leaf, ...}` for a tree of nested dicts (a state dict)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_str(path): leaf for path, leaf in leaves}


# --- Integrity: one jitted pass over the state per save and per restore. -------------------------

def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words (exact: a bitcast, not a value conversion)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  itemsize = jnp.dtype(x.dtype).itemsize
  if itemsize == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if itemsize == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  if itemsize == 1:
    return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes -> trailing dim of 2 words


def _fingerprint(x: jax.Array) -> jax.Array:
  """Position-weighted sum of the words of `x`, mod 2**32.

  Modular addition is associative and commutative, so the result is exact and the same whatever
  the sharding or reduction order: a checkpoint saved on one mesh verifies on another. The odd
  weights make any change to a single word change the sum.
  """
  w = _words(x).reshape(-1)
  weights = jnp.arange(w.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
  return jnp.sum(w * weights, dtype=jnp.uint32)


@jax.jit
def _summarize_jit(checked: PyTree, state_dict: PyTree) -> tuple[jax.Array, PyTree]:
  finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(checked)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  all_finite = jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True)
  return all_finite, jax.tree.map(_fingerprint, state_dict)


def _summarize(state_dict: PyTree) -> tuple[jax.Array, PyTree]:
  """(params and EMA params all finite, per-array fingerprints), in one jitted pass.

  Both outputs are replicated scalars, so fetching them is one small transfer, also when the
  state is sharded across processes.
  """
  if isinstance(state_dict, Mapping) and ('params' in state_dict or 'ema_params' in state_dict):
    checked = [state_dict.get('params'), state_dict.get('ema_params')]
  else:
    checked = state_dict  # not a TrainState: every float array must be finite
  return _summarize_jit(checked, state_dict)


# --- Data iterator state as JSON. ----------------------------------------------------------------

def _encode_json(x: Any) -> Any:
  if isinstance(x, (bytes, bytearray)):
    return {_BYTES_TAG: base64.b64encode(bytes(x)).decode('ascii')}
  if isinstance(x, Mapping):
    return {str(k): _encode_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_encode_json(v) for v in x]
  return x


def _decode_json(x: Any) -> Any:
  if isinstance(x, dict):
    if set(x) == {_BYTES_TAG}:
      return base64.b64decode(x[_BYTES_TAG])
    return {k: _decode_json(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_decode_json(v) for v in x]
  return x


class _PreserveStep(ocp.checkpoint_managers.PreservationPolicy):
  """Preserves the step returned by `get_step()` (the newest one known to be good)."""

  def __init__(self, get_step):
    self._get_step = get_step

  def should_preserve(self, checkpoints, *, context):
    del context  # unused: the decision depends on the step alone
    keep = self._get_step()
    return [info.step == keep for info in checkpoints]


class Checkpointer:
  """Saves and restores a `TrainState`-like pytree plus the data iterator state.

  See the module docstring for the on-disk layout and the guarantees.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = False):
    """Opens (creating if needed) the checkpoint directory.

    Args:
      directory: where step directories go, e.g. `<workdir>/checkpoints`; local path or `gs://`.
      max_to_keep: how many of the newest steps to keep; the newest known-good step is kept too.
      async_save: if True, `save` returns once the arrays are copied to host memory and the write
        happens in a background thread; call `wait_until_finished` (or `close`) before exiting.
    """
    if max_to_keep < 1:
      raise ValueError(f'max_to_keep must be >= 1, got {max_to_keep}: with 0 every checkpoint '
                       'would be deleted as soon as it is written.')
    if '://' not in directory:
      directory = os.path.abspath(directory)  # orbax requires an absolute path
    self._directory = epath.Path(directory)
    self._last_good: int | None = None  # newest step seen committed or restored
    self._pending: int | None = None  # step of a save not yet confirmed committed
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=max_to_keep),
        _PreserveStep(lambda: self._last_good),
    ])
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        preservation_policy=policy,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self._directory,
        options=options,
        item_handlers={
            _STATE: ocp.StandardCheckpointHandler(),
            _DATA: ocp.JsonCheckpointHandler(),
            _INTEGRITY: ocp.JsonCheckpointHandler(),
        },
    )

  @property
  def directory(self) -> epath.Path:
    return self._directory

  def step_path(self, step: int) -> epath.Path:
    """Directory of checkpoint `step`."""
    return ocp.step.build_step_path(self._directory, ocp.step.standard_name_format(), step)

  def latest_step(self) -> int | None:
    """Newest step on disk (committed; not checked for corruption), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Committed steps on disk, oldest first."""
    return sorted(self._manager.all_steps())

  def _confirm_pending(self) -> None:
    """Marks the previous save as good once orbax has committed it."""
    if self._pending is not None and ocp.step.is_path_finalized(self.step_path(self._pending)):
      self._last_good = self._pending
    self._pending = None

  def wait_until_finished(self) -> None:
    """Blocks until a background save has been written and committed.

    Raises:
      Whatever the background save raised, if it failed.
    """
    try:
      self._manager.wait_until_finished()
    finally:
      self._confirm_pending()

  def save(self, step: int, state: PyTree, *, data_state: dict | bytes | None = None,
           force: bool = False) -> bool:
    """Saves `state` (its pytree leaves) and `data_state` as checkpoint `step`.

    Args:
      step: the training step; must be newer than every step on disk.
      state: a `TrainState` (or any pytree) of `jax.Array`s, possibly sharded.
      data_state: the data iterator's state: a JSON-able dict (`bytes` values allowed).
      force: save even if orbax's save-interval policy would skip this step.

    Returns:
      True if a checkpoint was written (with `async_save`, started); False if it was skipped: the
      step is not newer than the latest one, or params / EMA params are not finite (logged as an
      error: the state stays in memory, and the previous checkpoint stays the one to resume from).
    """
    try:
      self._manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      # A failed background save must not kill training; the next save is a fresh attempt.
      logging.exception('The background save of checkpoint step %s (%s) failed; the newest good '
                        'checkpoint is still step %s.', self._pending,
                        self.step_path(self._pending) if self._pending is not None else '-',
                        self._last_good)
    self._confirm_pending()

    state_dict = flax.serialization.to_state_dict(state)
    all_finite, fingerprints = _summarize(state_dict)
    if not bool(all_finite):  # one scalar to host per save
      logging.error('Not saving checkpoint step %d to %s: params or ema_params contain NaN or Inf. '
                    'The last good checkpoint (step %s) is kept; lower the learning rate or enable '
                    'gradient clipping (optim.*) and resume from it.', step, self._directory,
                    self._last_good if self._last_good is not None else self.latest_step())
      return False
    integrity = {
        'format_version': _FORMAT_VERSION,
        'fingerprints': {k: int(v) for k, v in _flatten(jax.device_get(fingerprints)).items()},
    }
    data = {'data_state': _encode_json(data_state)}
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state_dict),
            _DATA: ocp.args.JsonSave(data),
            _INTEGRITY: ocp.args.JsonSave(integrity),
        }),
        force=force,
    )
    if not saved:
      logging.warning('Checkpoint step %d not saved: the latest step on disk is %s (steps only '
                      'move forward).', step, self.latest_step())
      return False
    self._pending = step
    if not self._manager.is_saving_in_progress():
      self._confirm_pending()
    return True

  def _check_shapes(self, step: int, metadata: PyTree, abstract_dict: PyTree) -> None:
    saved = {k: tuple(v.shape) for k, v in _flatten(metadata).items()}
    expected = {k: tuple(v.shape) for k, v in _flatten(abstract_dict).items()}
    where = self.step_path(step)
    for name, shape in expected.items():
      if name not in saved:
        raise ValueError(
            f'Checkpoint {where} has no array {name!r} (expected shape {shape}): it was written '
            f'by a different model or optimizer. {_FIX_SHAPES}')
      if saved[name] != shape:
        raise ValueError(
            f'Checkpoint {where} does not match the model: {name!r} has shape {saved[name]} in the '
            f'checkpoint but the model expects {shape}. {_FIX_SHAPES}')
    extra = sorted(set(saved) - set(expected))
    if extra:
      raise ValueError(
          f'Checkpoint {where} has arrays the model does not, first {extra[0]!r} (shape '
          f'{saved[extra[0]]}): it was written by a different model or optimizer. {_FIX_SHAPES}')

  def _try_restore(self, step: int, abstract_dict: PyTree) -> tuple[PyTree, Any]:
    """Restores one step; raises `_Corrupt` for damage, `ValueError` for a model mismatch."""
    try:
      metadata = self._manager.item_metadata(step)[_STATE]
      metadata = getattr(metadata, 'tree', metadata)
      if metadata is None:
        raise FileNotFoundError('no readable metadata for the state item')
    except Exception as e:  # pylint: disable=broad-except
      raise _Corrupt(f'metadata unreadable: {type(e).__name__}: {_short(e)}') from e
    self._check_shapes(step, metadata, abstract_dict)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(abstract_dict),
          _DATA: ocp.args.JsonRestore(),
          _INTEGRITY: ocp.args.JsonRestore(),
      }))
    except Exception as e:  # pylint: disable=broad-except
      raise _Corrupt(f'read failed: {type(e).__name__}: {_short(e)}') from e
    state_dict = restored[_STATE]
    expected = restored[_INTEGRITY]['fingerprints']
    _, fingerprints = _summarize(state_dict)
    for name, value in _flatten(jax.device_get(fingerprints)).items():
      if expected.get(name) != int(value):
        raise _Corrupt(f'array {name!r} does not match the fingerprint written with it (data '
                       'changed on disk after the save)')
    return state_dict, _decode_json(restored[_DATA]['data_state'])

  def _quarantine(self, steps: list[int]) -> None:
    """Renames corrupted steps out of orbax's view so their step numbers can be saved again."""
    if ocp.multihost.is_primary_host(0):
      for step in steps:
        src = self.step_path(step)
        dst = src.parent / f'{src.name}.corrupt-{int(time.time())}'
        logging.warning('Moving corrupted checkpoint %s to %s.', src, dst)
        src.rename(dst)
    ocp.multihost.sync_global_processes('diffusion_jax_checkpointing_quarantine')
    self._manager.reload()

  def restore(self, abstract_state: PyTree, *, step: int | None = None
              ) -> tuple[PyTree, dict | bytes | None, int] | None:
    """Restores the newest good checkpoint (or `step`) into the shapes and shardings given.

    Args:
      abstract_state: the state's structure with `jax.ShapeDtypeStruct` leaves carrying the target
        `sharding` (any mesh: a checkpoint written on one mesh restores onto another). Static fields
        (`apply_fn`, `tx`) are taken from it.
      step: a specific step; by default the newest, falling back to older ones if it is corrupted.

    Returns:
      `(state, data_state, step)`, or None when the directory holds no checkpoint.

    Raises:
      ValueError: the checkpoint's shapes or parameter names differ from `abstract_state` (the
        message names the first differing parameter); or `step` does not exist.
      CheckpointCorruptedError: no candidate step could be read (the message lists paths and
        reasons).
    """
    self._manager.reload()  # pick up steps written or removed by another process or by hand
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    if step is not None:
      if step not in steps:
        raise ValueError(f'No checkpoint for step {step} in {self._directory}; available steps: '
                         f'{sorted(steps)}.')
      steps = [step]
    abstract_dict = flax.serialization.to_state_dict(abstract_state)
    for name, leaf in _flatten(abstract_dict).items():
      if getattr(leaf, 'sharding', None) is None:
        raise ValueError(
            f'abstract_state leaf {name!r} has no sharding, so orbax cannot know where to put it. '
            'Build it as jax.ShapeDtypeStruct(shape, dtype, sharding=...) from the state shardings '
            '(see sharding.create_sharded_state), e.g. jax.tree.map(lambda x, s: '
            'jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), jax.eval_shape(init, key), '
            'shardings).')
    failures = []
    for candidate in steps:
      try:
        state_dict, data_state = self._try_restore(candidate, abstract_dict)
      except _Corrupt as e:
        path = self.step_path(candidate)
        logging.warning('Checkpoint %s is corrupted (%s); trying the previous step.', path, e)
        failures.append((candidate, path, str(e)))
        continue
      if failures and step is None:
        self._quarantine([s for s, _, _ in failures])
      self._last_good = candidate
      return flax.serialization.from_state_dict(abstract_state, state_dict), data_state, candidate
    listing = '\n'.join(f'  {path}: {reason}' for _, path, reason in failures)
    raise CheckpointCorruptedError(
        f'No checkpoint in {self._directory} could be restored:\n{listing}\nMove the damaged step '
        'directories away to start over from scratch, or restore a backup of them.')

  def close(self) -> None:
    """Waits for a background save, then releases orbax's resources."""
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()
