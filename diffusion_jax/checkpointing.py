"""Saving and restoring the training state and the data iterator state with orbax.

One `Checkpointer` wraps an `orbax.checkpoint.CheckpointManager` over `<workdir>/checkpoints`. Each
step directory holds three items, and a fourth when `save` is given `frozen`:

- `state`: the pytree leaves of the `TrainState` (step, params, ema_params, opt_state), written with
  `StandardSave` as `flax.serialization.to_state_dict(state)`, so the layout is plain nested dicts
  keyed by parameter names (`params/Dense_0/kernel`) and independent of Python class names. Static
  fields (`apply_fn`, `tx`) are not saved; `restore` takes them from `abstract_state`.
- `data`: the data iterator state as JSON (`JsonSave`); `bytes` values are stored base64-encoded.
- `integrity`: JSON with a 32-bit fingerprint, the shape and the dtype of every array, fingerprints
  computed on device when saving and checked after restoring, so silently corrupted data (a
  flipped byte inside a compressed chunk, which tensorstore reads back without complaint) is
  caught; the shapes let one subtree be checked against a model without opening the others.
- `frozen` (optional): trees that are used but not trained (an autoencoder, a text encoder), in
  their own item, with their own fingerprints; `restore_frozen` reads them alone.

Parameters alone: `Checkpointer.restore_params` and `load_params` read one subtree of the state
(`ema_params` by default) through orbax's partial restore (`PyTreeRestore(partial_restore=True)`):
the optimizer state is not read, not even its array headers, so sampling from or fine-tuning on a
checkpoint costs the parameters' bytes only. `check_tree` compares a parameter tree with the
shapes a model expects.

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
- `restore_params` / `restore_frozen` give the same guarantees for their subtree: its shapes and
  dtypes checked first, its fingerprints after, a damaged step skipped (and, when no step was
  asked for, quarantined) for the previous one. `load_params` does the same read-only: it never
  renames anything in the directory it reads.
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

    # Sampling, or initializing another run: the EMA parameters only, onto any mesh.
    ema_params = checkpointing.load_params('runs/digits/checkpoints', abstract_params)
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
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

_STATE = 'state'
_DATA = 'data'
_INTEGRITY = 'integrity'
_FROZEN = 'frozen'
_BYTES_TAG = '__bytes_base64__'
_FORMAT_VERSION = 1
_FIX_SHAPES = ('Use the config the checkpoint was trained with, or a fresh --workdir to train '
               'this model from scratch.')
_FIX_LOAD = 'Load it into the model it was trained with (the same model config).'


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


# --- Comparing trees with what a model expects. --------------------------------------------------

class _Spec:
  """Shape and dtype of a saved array, as recorded in the integrity item (a pytree leaf)."""

  def __init__(self, shape, dtype: str):
    self.shape, self.dtype = tuple(shape), dtype


def _spec_str(leaf) -> str:
  """`(5, 16) float32` for an array, a `jax.ShapeDtypeStruct`, orbax metadata or a `_Spec`."""
  return f'{_shape(leaf)} {_dtype(leaf)}'


def _shape(leaf) -> tuple[int, ...]:
  return tuple(leaf.shape) if hasattr(leaf, 'shape') else np.shape(leaf)


def _dtype(leaf) -> str:
  dtype = getattr(leaf, 'dtype', None)
  return str(dtype) if dtype is not None else str(np.asarray(leaf).dtype)


def _first_mismatch(expected: Mapping[str, Any], got: Mapping[str, Any], *, name: str,
                    label: str) -> str | None:
  """Describes the first path of `expected` missing from `got` or of another shape or dtype, else
  the first path of `got` that `expected` lacks; None when they agree. Paths read `name/...`."""
  def full(path):
    return f'{name}/{path}' if name and path else (name or path)
  for path, leaf in expected.items():
    if path not in got:
      return f'{full(path)!r} is missing from {label} (the model expects {_spec_str(leaf)})'
    if _shape(got[path]) != _shape(leaf) or _dtype(got[path]) != _dtype(leaf):
      return (f'{full(path)!r} is {_spec_str(got[path])} in {label} but the model expects '
              f'{_spec_str(leaf)}')
  for path, leaf in got.items():
    if path not in expected:
      return f'{label} has {full(path)!r}, {_spec_str(leaf)}, which the model does not'
  return None


def check_tree(abstract: PyTree, tree: PyTree, *, name: str = 'params') -> None:
  """Checks that `tree` has exactly the arrays, shapes and dtypes of `abstract`.

  For parameter trees that come from elsewhere (a checkpoint, `init_params` passed by a caller, a
  converted pretrained model) before they meet a jitted function that would fail on them with a
  less helpful message.

  Args:
    abstract: the tree the model expects, e.g. `jax.eval_shape(model.init, ...)['params']`; leaves
      with `shape` and `dtype` (`jax.ShapeDtypeStruct`, arrays).
    tree: the tree to check; nested dicts, `FrozenDict`s and flax structs compare by their keys.
    name: prefix of the paths in the message (`params` -> `params/Conv_0/kernel`).

  Raises:
    ValueError: naming the first path (in sorted key order) that is missing from `tree`, or has
      another shape or dtype (both given), or else the first path of `tree` that `abstract` lacks.
  """
  mismatch = _first_mismatch(_flatten(flax.serialization.to_state_dict(abstract)),
                             _flatten(flax.serialization.to_state_dict(tree)),
                             name=name, label=f'the {name} tree' if name else 'the tree')
  if mismatch is not None:
    raise ValueError(f'The {name or "given"} tree does not match the model: {mismatch}.')


def _require_shardings(abstract_dict: PyTree, *, what: str, name: str) -> None:
  for path, leaf in _flatten(abstract_dict).items():
    if getattr(leaf, 'sharding', None) is None:
      full = f'{name}/{path}' if name and path else (name or path)
      raise ValueError(
          f'{what} leaf {full!r} has no sharding, so orbax cannot know where to put it. '
          'Build it as jax.ShapeDtypeStruct(shape, dtype, sharding=...) from the state shardings '
          '(see sharding.create_sharded_state), e.g. jax.tree.map(lambda x, s: '
          'jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), jax.eval_shape(init, key), '
          'shardings).')


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


_fingerprints = jax.jit(lambda tree: jax.tree.map(_fingerprint, tree))


def _record(tree_dict: PyTree, fingerprints: PyTree) -> dict[str, Any]:
  """The integrity entries of one item: fingerprint, shape and dtype of every array, by path."""
  return {
      'fingerprints': {k: int(v) for k, v in _flatten(jax.device_get(fingerprints)).items()},
      'arrays': {k: [list(_shape(v)), _dtype(v)] for k, v in _flatten(tree_dict).items()},
  }


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


# --- Reading one subtree of one step. ------------------------------------------------------------

def _nest(which: str, tree: PyTree) -> PyTree:
  """`{'a': {'b': tree}}` for `which='a/b'`; `tree` itself for `which=''`."""
  for key in reversed([k for k in which.split('/') if k]):
    tree = {key: tree}
  return tree


def _pick(which: str, tree: PyTree) -> PyTree:
  for key in [k for k in which.split('/') if k]:
    tree = tree[key]
  return tree


def _read_tree(step_dir: epath.Path, abstract_dict: PyTree, *, item: str, which: str,
               fix: str = _FIX_SHAPES) -> PyTree:
  """Reads the subtree `which` ('' = all) of item `item` of one step into `abstract_dict`.

  Only that subtree's arrays are opened: its shapes come from the integrity record (from orbax's
  metadata of the whole item for checkpoints written before the record had them), its data from
  orbax's partial restore. Raises `_Corrupt` for damage, `ValueError` for a model mismatch.
  """
  name = which or item
  try:
    integrity = ocp.JsonCheckpointHandler().restore(step_dir / _INTEGRITY)
  except Exception as e:  # pylint: disable=broad-except
    raise _Corrupt(f'integrity record unreadable: {type(e).__name__}: {_short(e)}') from e
  record = integrity if item == _STATE else integrity.get(item)
  if record is None:
    raise ValueError(f'Checkpoint {step_dir} holds no {item!r} item: it was saved without one '
                     f'(Checkpointer.save(..., {item}=...) was not given it).')
  prefix = f'{which}/' if which else ''
  expected_fingerprints = {k[len(prefix):]: v for k, v in record['fingerprints'].items()
                           if k.startswith(prefix)}
  if not expected_fingerprints:
    tops = sorted({k.split('/')[0] for k in record['fingerprints']})
    raise ValueError(f'Checkpoint {step_dir} has no {which!r} subtree in its {item!r} item; its '
                     f'top-level names are {tops}.')
  if 'arrays' in record:
    saved = {k[len(prefix):]: _Spec(*v) for k, v in record['arrays'].items()
             if k.startswith(prefix)}
  else:  # written before the integrity record had shapes: opens every array's header
    try:
      metadata = ocp.PyTreeCheckpointHandler().metadata(step_dir / item)
      saved = _flatten(_pick(which, getattr(metadata, 'tree', metadata)))
    except Exception as e:  # pylint: disable=broad-except
      raise _Corrupt(f'metadata unreadable: {type(e).__name__}: {_short(e)}') from e
  mismatch = _first_mismatch(_flatten(abstract_dict), saved, name=name, label='the checkpoint')
  if mismatch is not None:
    raise ValueError(f'Checkpoint {step_dir} does not match the model: {mismatch}. {fix}')

  target = _nest(which, abstract_dict)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    restored = handler.restore(step_dir / item, args=ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,  # the arrays of `target` only: no optimizer state is read
    ))
    tree_dict = _pick(which, restored)
  except Exception as e:  # pylint: disable=broad-except
    raise _Corrupt(f'read failed: {type(e).__name__}: {_short(e)}') from e
  finally:
    handler.close()
  for path, value in _flatten(jax.device_get(_fingerprints(tree_dict))).items():
    if expected_fingerprints.get(path) != int(value):
      raise _Corrupt(f'array {name + "/" + path!r} does not match the fingerprint written with it '
                     '(data changed on disk after the save)')
  return tree_dict


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

  def __init__(self, directory: str | os.PathLike[str], *, max_to_keep: int = 3,
               async_save: bool = False, read_only: bool = False):
    """Opens (creating if needed) the checkpoint directory.

    Args:
      directory: where step directories go, e.g. `<workdir>/checkpoints`; local path or `gs://`.
      max_to_keep: how many of the newest steps to keep; the newest known-good step is kept too.
      async_save: if True, `save` returns once the arrays are copied to host memory and the write
        happens in a background thread; call `wait_until_finished` (or `close`) before exiting.
      read_only: only restore: nothing is created, saved, deleted or quarantined (a damaged step
        is skipped for the previous one all the same). For reading another run's checkpoints.
    """
    if max_to_keep < 1:
      raise ValueError(f'max_to_keep must be >= 1, got {max_to_keep}: with 0 every checkpoint '
                       'would be deleted as soon as it is written.')
    self._directory = _absolute(directory)
    self._read_only = read_only
    self._last_good: int | None = None  # newest step seen committed or restored
    self._pending: int | None = None  # step of a save not yet confirmed committed
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    else:
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
            _FROZEN: ocp.StandardCheckpointHandler(),
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
           frozen: PyTree | None = None, force: bool = False) -> bool:
    """Saves `state` (its pytree leaves) and `data_state` as checkpoint `step`.

    Args:
      step: the training step; must be newer than every step on disk.
      state: a `TrainState` (or any pytree) of `jax.Array`s, possibly sharded.
      data_state: the data iterator's state: a JSON-able dict (`bytes` values allowed).
      frozen: trees used but not trained (e.g. `{'autoencoder': params}`), saved in their own item
        with their own fingerprints, restored by `restore_frozen`; nothing is saved for None.
      force: save even if orbax's save-interval policy would skip this step.

    Returns:
      True if a checkpoint was written (with `async_save`, started); False if it was skipped: the
      step is not newer than the latest one, or params / EMA params are not finite (logged as an
      error: the state stays in memory, and the previous checkpoint stays the one to resume from).
    """
    if self._read_only:
      raise ValueError(f'Checkpointer({self._directory}) was opened read_only: it does not save.')
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
    integrity = {'format_version': _FORMAT_VERSION, **_record(state_dict, fingerprints)}
    items = {
        _STATE: ocp.args.StandardSave(state_dict),
        _DATA: ocp.args.JsonSave({'data_state': _encode_json(data_state)}),
    }
    if frozen is not None:
      frozen_dict = flax.serialization.to_state_dict(frozen)
      integrity[_FROZEN] = _record(frozen_dict, _fingerprints(frozen_dict))
      items[_FROZEN] = ocp.args.StandardSave(frozen_dict)
    items[_INTEGRITY] = ocp.args.JsonSave(integrity)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
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
    if self._read_only:
      logging.warning('Not moving corrupted checkpoints %s out of the way: opened read_only.',
                      [str(self.step_path(step)) for step in steps])
      return
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
    steps = self._candidates(step)
    if steps is None:
      return None
    abstract_dict = flax.serialization.to_state_dict(abstract_state)
    _require_shardings(abstract_dict, what='abstract_state', name='')
    (state_dict, data_state), restored_step = self._first_good(
        steps, lambda s: self._try_restore(s, abstract_dict), quarantine=step is None)
    self._last_good = restored_step
    return (flax.serialization.from_state_dict(abstract_state, state_dict), data_state,
            restored_step)

  def restore_params(self, abstract_params: PyTree, *, step: int | None = None,
                     which: str = 'ema_params') -> tuple[PyTree, int] | None:
    """Restores one parameter subtree of the newest good checkpoint (or `step`), and nothing else.

    For sampling and for initializing another run: the optimizer state (and the other parameter
    copy) is not read, through orbax's partial restore. The subtree's shapes and dtypes are checked
    against `abstract_params` before any array is read, its fingerprints after.

    Args:
      abstract_params: the parameter tree with `jax.ShapeDtypeStruct` leaves carrying the target
        `sharding`; the result has its structure (a `FrozenDict` stays one).
      step: a specific step; by default the newest whose `which` subtree is intact, falling back
        (and quarantining, as `restore` does) past damaged ones.
      which: the subtree of the saved state: `'ema_params'` (what sampling uses) or `'params'`.

    Returns:
      `(params, step)`, or None when the directory holds no checkpoint.

    Raises:
      ValueError: the checkpoint's `which` subtree differs from `abstract_params` (the message
        names the first differing path, e.g. `'ema_params/Conv_0/kernel'`, and both shapes), it
        has no such subtree, or `step` does not exist.
      CheckpointCorruptedError: no candidate step's subtree could be read.
    """
    return self._restore_subtree(abstract_params, step=step, item=_STATE, which=which,
                                 what='abstract_params')

  def restore_frozen(self, abstract_frozen: PyTree, *, step: int | None = None
                     ) -> tuple[PyTree, int] | None:
    """Restores the `frozen` trees saved with the newest good checkpoint (or `step`), alone.

    Args:
      abstract_frozen: their structure with sharded `jax.ShapeDtypeStruct` leaves.
      step: as for `restore_params`.

    Returns:
      `(frozen, step)`, or None when the directory holds no checkpoint.

    Raises:
      ValueError: the saved trees differ from `abstract_frozen` (first differing path named), or
        the step was saved without `frozen`.
      CheckpointCorruptedError: no candidate step's frozen trees could be read.
    """
    return self._restore_subtree(abstract_frozen, step=step, item=_FROZEN, which='',
                                 what='abstract_frozen')

  def _restore_subtree(self, abstract: PyTree, *, step: int | None, item: str, which: str,
                       what: str, fix: str = _FIX_SHAPES) -> tuple[PyTree, int] | None:
    steps = self._candidates(step)
    if steps is None:
      return None
    abstract_dict = flax.serialization.to_state_dict(abstract)
    _require_shardings(abstract_dict, what=what, name=which or item)
    # Not recorded as the newest good step for retention: only this subtree was checked.
    tree_dict, restored_step = self._first_good(
        steps, lambda s: _read_tree(self.step_path(s), abstract_dict, item=item, which=which,
                                    fix=fix),
        quarantine=step is None)
    return flax.serialization.from_state_dict(abstract, tree_dict), restored_step

  def _candidates(self, step: int | None) -> list[int] | None:
    """Steps to try, newest first: all on disk, or just `step`; None if there are none."""
    self._manager.reload()  # pick up steps written or removed by another process or by hand
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    if step is not None:
      if step not in steps:
        raise ValueError(f'No checkpoint for step {step} in {self._directory}; available steps: '
                         f'{sorted(steps)}.')
      steps = [step]
    return steps

  def _first_good(self, steps: list[int], attempt, *, quarantine: bool) -> tuple[Any, int]:
    """`(attempt(s), s)` for the first of `steps` that is not corrupted.

    Corrupted steps newer than it are logged and, if `quarantine`, moved out of the way.

    Raises:
      CheckpointCorruptedError: every step is corrupted (the message lists paths and reasons).
    """
    failures = []
    for candidate in steps:
      try:
        result = attempt(candidate)
      except _Corrupt as e:
        path = self.step_path(candidate)
        logging.warning('Checkpoint %s is corrupted (%s); trying the previous step.', path, e)
        failures.append((candidate, path, str(e)))
        continue
      if failures and quarantine:
        self._quarantine([s for s, _, _ in failures])
      return result, candidate
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


def _absolute(path: str | os.PathLike[str]) -> epath.Path:
  path = os.fspath(path)
  if '://' not in path:
    path = os.path.abspath(path)  # orbax requires an absolute path
  return epath.Path(path)


def load_params(path: str | os.PathLike[str], abstract_params: PyTree, *,
                which: str = 'ema_params') -> PyTree:
  """Loads one parameter subtree of a checkpoint, e.g. another run's EMA parameters.

  Read-only (nothing in `path` is created, renamed or deleted) and reads that subtree only, with
  the checks of `Checkpointer.restore_params`.

  Args:
    path: a run's `checkpoints/` directory (its newest step whose subtree is intact is used) or
      one step's directory (`checkpoints/1000`); any path orbax supports (`gs://...` included).
    abstract_params: the parameter tree with sharded `jax.ShapeDtypeStruct` leaves; the result
      lands on those shardings.
    which: the subtree of the saved state: `'ema_params'` or `'params'`.

  Returns:
    The parameters, in the structure of `abstract_params`.

  Raises:
    FileNotFoundError: `path` does not exist, holds no finished checkpoint step, or is an
      unfinished save.
    ValueError: the saved subtree does not match `abstract_params` (first differing path named).
    CheckpointCorruptedError: no step's subtree could be read (`path` is one step: it is damaged).
  """
  path = _absolute(path)
  if not path.exists():
    raise FileNotFoundError(f'No checkpoint at {path}: the path does not exist. Give a run\'s '
                            'checkpoints/ directory or one step\'s directory inside it.')
  if (path / _STATE).exists():  # one step's directory
    if not ocp.step.is_path_finalized(path):
      raise FileNotFoundError(f'{path} is a checkpoint whose save never finished (no commit); '
                              'use a finished step.')
    abstract_dict = flax.serialization.to_state_dict(abstract_params)
    _require_shardings(abstract_dict, what='abstract_params', name=which)
    try:
      params_dict = _read_tree(path, abstract_dict, item=_STATE, which=which, fix=_FIX_LOAD)
    except _Corrupt as e:
      raise CheckpointCorruptedError(f'Checkpoint {path} could not be restored: {e}') from e
    return flax.serialization.from_state_dict(abstract_params, params_dict)
  ckpt = Checkpointer(path, read_only=True)
  try:
    restored = ckpt._restore_subtree(  # pylint: disable=protected-access
        abstract_params, step=None, item=_STATE, which=which, what='abstract_params',
        fix=_FIX_LOAD)
  finally:
    ckpt.close()
  if restored is None:
    hint = (f' It holds a checkpoints/ directory: did you mean {path / "checkpoints"}?'
            if (path / 'checkpoints').exists() else '')
    raise FileNotFoundError(f'No checkpoint in {path}: expected a run\'s checkpoints/ directory '
                            f'(holding step directories such as 1000/) or one step\'s directory '
                            f'(holding state/).{hint}')
  return restored[0]
