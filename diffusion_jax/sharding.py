"""Device mesh, parameter and batch shardings, host-local -> global arrays.

Training is one `jax.jit` over a 2-D device mesh with axes `('data', 'fsdp')`; there is no `pmap`.
The batch is split over both axes (every device sees a different slice of the global batch), and
large parameters are additionally split along the `fsdp` axis (ZeRO-3 / FSDP style) so that a model
too big for one device's memory still fits; XLA inserts the all-gathers and reduce-scatters.

Typical use from the trainer::

    mesh = sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp)
    sharding.check_batch_size(config.training.batch_size, mesh)
    state, state_shardings = sharding.create_sharded_state(init_fn, mesh, key)
    batch = sharding.global_batch(next(local_iterator), mesh)
"""

from collections.abc import Callable, Sequence
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ('data', 'fsdp')
# The leading batch dimension is split over every device: data parallelism over 'data', and FSDP
# is data parallelism too (each fsdp shard sees its own examples), so the batch also splits there.
BATCH_AXES = ('data', 'fsdp')

PyTree = Any


def make_mesh(*, data: int = -1, fsdp: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the `('data', 'fsdp')` device mesh.

  Args:
    data: size of the data-parallel axis; -1 means "all devices not used by `fsdp`".
    fsdp: size of the parameter-sharding axis; 1 means every parameter is replicated.
    devices: the devices to lay out; defaults to `jax.devices()` (every device of every process).

  Returns:
    A `jax.sharding.Mesh` of shape `(data, fsdp)` with axis names `('data', 'fsdp')`.

  Raises:
    ValueError: if a size is not positive (other than `data=-1`) or `data * fsdp` is not the
      number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  num_devices = len(devices)
  if fsdp < 1:
    raise ValueError(f'mesh.fsdp must be >= 1, got {fsdp}. Set --config.mesh.fsdp=1 to replicate '
                     'parameters, or to a divisor of the device count to shard them.')
  if data == -1:
    if num_devices % fsdp:
      raise ValueError(
          f'mesh.fsdp={fsdp} does not divide the {num_devices} available devices, so mesh.data=-1 '
          f'("the rest") is undefined. Set --config.mesh.fsdp to a divisor of {num_devices}.')
    data = num_devices // fsdp
  elif data < 1:
    raise ValueError(f'mesh.data must be >= 1 or -1 (all remaining devices), got {data}.')
  if data * fsdp != num_devices:
    raise ValueError(
        f'mesh.data * mesh.fsdp = {data} * {fsdp} = {data * fsdp}, but there are {num_devices} '
        f'devices. Set --config.mesh.data=-1 to use all remaining devices, or choose sizes whose '
        f'product is {num_devices}.')
  # jax.make_mesh picks a device order matching the physical topology (ICI rings on TPU), which a
  # plain reshape of jax.devices() does not. Auto axes: XLA propagates shardings and inserts the
  # collectives (recent jax defaults make_mesh to Explicit axes, under which an fsdp-sharded kernel
  # times a batch-sharded input is a type error instead of an all-gather).
  return jax.make_mesh((data, fsdp), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch array: leading (batch) dim split over every device, the rest whole."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that puts a full copy on every device (scalars, keys, small arrays)."""
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """Checks that the global batch splits evenly over devices and over processes.

  Args:
    global_batch_size: `training.batch_size`, summed over all processes.
    mesh: the training mesh.

  Raises:
    ValueError: naming `training.batch_size` when it does not divide evenly.
  """
  num_devices = mesh.devices.size
  num_processes = jax.process_count()
  if global_batch_size % num_devices:
    raise ValueError(
        f'training.batch_size={global_batch_size} is not divisible by the {num_devices} devices of '
        f'the mesh {dict(mesh.shape)}. Set --config.training.batch_size to a multiple of '
        f'{num_devices}.')
  if global_batch_size % num_processes:
    raise ValueError(
        f'training.batch_size={global_batch_size} is not divisible by the {num_processes} '
        f'processes (each process loads batch_size / process_count examples). Set '
        f'--config.training.batch_size to a multiple of {num_processes}.')


def _fsdp_spec(shape: Sequence[int], *, fsdp: int, min_size: int) -> PartitionSpec:
  """Shards the largest dimension divisible by `fsdp`; replicates small or indivisible arrays."""
  if math.prod(shape) < min_size:
    return PartitionSpec()  # all-gathering tiny arrays costs more latency than it saves memory
  candidates = [i for i, d in enumerate(shape) if d % fsdp == 0]
  if not candidates:
    return PartitionSpec()
  # Largest dim first; on ties the last one (usually the output features, which is what a Dense
  # kernel's matmul reduces over least) -- any choice is correct, this one is deterministic.
  axis = max(candidates, key=lambda i: (shape[i], i))
  spec = [None] * len(shape)
  spec[axis] = 'fsdp'
  return PartitionSpec(*spec)


def param_sharding(abstract_tree: PyTree, mesh: Mesh, *, min_size: int = 2**14) -> PyTree:
  """Shardings for a tree of arrays (params, EMA params, optimizer state, a whole TrainState).

  With `mesh.shape['fsdp'] == 1` everything is replicated (pure data parallelism). Otherwise each
  array with at least `min_size` elements is split along its largest dimension divisible by the
  fsdp size; smaller or indivisible arrays (biases, norms, scalars like `step`) are replicated.
  Adam's moments have their parameter's shape, so they get the same sharding as the parameter.

  Args:
    abstract_tree: pytree whose leaves have `.shape` (`jax.ShapeDtypeStruct` from
      `jax.eval_shape`, or arrays).
    mesh: a mesh with an `'fsdp'` axis (from `make_mesh`).
    min_size: arrays smaller than this many elements stay replicated.

  Returns:
    A pytree of `NamedSharding` with the structure of `abstract_tree`.
  """
  fsdp = mesh.shape['fsdp']

  def leaf_sharding(x):
    shape = np.shape(x)
    if fsdp == 1:
      return replicated(mesh)
    return NamedSharding(mesh, _fsdp_spec(shape, fsdp=fsdp, min_size=min_size))

  return jax.tree.map(leaf_sharding, abstract_tree)


def create_sharded_state(init_fn: Callable[..., PyTree], mesh: Mesh, *args,
                         min_size: int = 2**14) -> tuple[PyTree, PyTree]:
  """Runs `init_fn(*args)` so that its output is born sharded over `mesh`.

  The output is never materialized on one device first, so a model that only fits when sharded
  can still be initialized.

  Args:
    init_fn: pure function returning the state pytree (e.g. a `TrainState`; static fields such as
      `tx` pass through untouched).
    mesh: the training mesh.
    *args: arguments of `init_fn` (e.g. a PRNG key); they are traced, not static.
    min_size: forwarded to `param_sharding`.

  Returns:
    `(state, shardings)`: the sharded state and the matching pytree of `NamedSharding` (use it as
    `out_shardings` of the train step and to build the abstract state for checkpoint restores).
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = param_sharding(abstract, mesh, min_size=min_size)
  state = jax.jit(init_fn, out_shardings=shardings)(*args)
  return state, shardings


def with_shardings(abstract_tree: PyTree, shardings: PyTree) -> PyTree:
  """`jax.ShapeDtypeStruct` leaves carrying `shardings`: the target of a checkpoint restore.

  Args:
    abstract_tree: pytree whose leaves have `.shape` and `.dtype` (from `jax.eval_shape`).
    shardings: the matching pytree of `jax.sharding.Sharding` (e.g. from `param_sharding`).
  """
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


def put_params(tree: PyTree, mesh: Mesh, *, min_size: int = 2**14) -> PyTree:
  """Places a tree of arrays with the sharding `param_sharding` gives it (e.g. a frozen tree).

  Every process must pass the same values (as when each loads the same weights file); each then
  keeps only the shards of its own devices.

  Args:
    tree: pytree of NumPy or JAX arrays.
    mesh: the training mesh.
    min_size: forwarded to `param_sharding`.

  Returns:
    The same tree of global `jax.Array`s.
  """
  shardings = param_sharding(tree, mesh, min_size=min_size)

  def put(x, target):
    if isinstance(x, jax.Array):
      if x.sharding == target:
        return x
      if not x.is_fully_addressable:  # already global: reshard on the devices
        return jax.device_put(x, target)
      x = jax.device_get(x)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, target, lambda index: x[index])

  return jax.tree.map(put, tree, shardings)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays sharded over the mesh.

  Args:
    local_batch: this process's examples, each array `[global_batch / process_count, ...]`.
    mesh: the training mesh.

  Returns:
    The same keys, each a global `jax.Array` `[global_batch, ...]` with `batch_sharding(mesh)`.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(x))
          for k, x in local_batch.items()}
