"""Tests for diffusion_jax.checkpointing (orbax-backed save/restore of a TrainState)."""

import gc
import os
import pathlib
import subprocess
import sys
import textwrap
from unittest import mock

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from diffusion_jax import checkpointing

# Reading a corrupted step makes orbax drop the coroutines of the reads still in flight; Python
# reports them when they are garbage collected, in whichever test runs then.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


@pytest.fixture(autouse=True)
def _collect_dropped_reads():
  yield
  gc.collect()  # inside the test, where the filter above applies, not at interpreter exit


class TrainState(struct.PyTreeNode):
  """Same shape as the trainer's TrainState (not imported: that module is not ours)."""
  step: jax.Array
  params: dict
  ema_params: dict
  opt_state: optax.OptState
  apply_fn: object = struct.field(pytree_node=False)
  tx: object = struct.field(pytree_node=False)


class MLP(nn.Module):
  features: int = 16

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.features, name='hidden')(x))
    return nn.Dense(3, name='out')(x)


def make_init(features: int = 16):
  model, tx = MLP(features=features), optax.adam(1e-2)

  def init(key):
    params = model.init(key, jnp.zeros((1, 5)))['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=tx.init(params), apply_fn=model.apply, tx=tx)
  return init


def trained_state(seed: int = 0, *, steps: int = 2, features: int = 16) -> TrainState:
  """A state whose every leaf (Adam moments, count, EMA) differs from its initial value."""
  state = make_init(features)(jax.random.key(seed))
  x = jax.random.normal(jax.random.key(seed + 100), (8, 5))
  for _ in range(steps):
    grads = jax.grad(lambda p: jnp.sum(state.apply_fn({'params': p}, x) ** 2))(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.ema_params, params)
    state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
  return state


def abstract_of(init, sharding=None):
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      jax.eval_shape(init, jax.random.key(0)))


def assert_bitwise_equal(a, b):
  # Paths, not treedefs: the static fields (tx, apply_fn) of two TrainStates are different objects.
  pa, la = zip(*jax.tree_util.tree_flatten_with_path(a)[0])
  pb, lb = zip(*jax.tree_util.tree_flatten_with_path(b)[0])
  assert pa == pb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                  np.asarray(y).reshape(-1).view(np.uint8))


def largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The biggest chunk-data file of the state item (not metadata, not the manifest)."""
  return max(step_dir.glob('state/ocdbt.process_*/d/*'), key=lambda p: p.stat().st_size)


@pytest.fixture
def ckpt_dir(tmp_path):
  return str(tmp_path / 'checkpoints')


def test_empty_directory_restores_none(ckpt_dir):
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  assert ckpt.latest_step() is None
  assert ckpt.restore(abstract_of(make_init())) is None
  ckpt.close()


@pytest.mark.parametrize('async_save', [False, True])
def test_round_trip_is_bitwise_and_keeps_static_fields(ckpt_dir, async_save):
  state = trained_state()
  data_state = {'epoch': 3, 'index': [1, 2], 'rng': b'\x00\xffbytes', 'nested': {'b': b'x'}}
  ckpt = checkpointing.Checkpointer(ckpt_dir, async_save=async_save)
  assert ckpt.save(2, state, data_state=data_state)
  ckpt.wait_until_finished()
  ckpt.close()

  init = make_init()
  restored, restored_data, step = checkpointing.Checkpointer(ckpt_dir).restore(abstract_of(init))
  assert step == 2
  assert isinstance(restored, TrainState)
  assert restored.tx is not None and restored.apply_fn is not None
  assert_bitwise_equal(restored, state)
  assert restored_data == data_state
  # The restored state is usable: static fields came from the abstract state.
  restored.tx.update(restored.params, restored.opt_state, restored.params)


def test_bytes_data_state_round_trip(ckpt_dir):
  # grain's DataLoader iterators report their state as bytes.
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  ckpt.save(1, trained_state(), data_state=b'{"next_index": 7}')
  assert ckpt.restore(abstract_of(make_init()))[1] == b'{"next_index": 7}'
  ckpt.close()


def test_keeps_last_k_and_steps_only_move_forward(ckpt_dir):
  ckpt = checkpointing.Checkpointer(ckpt_dir, max_to_keep=2)
  state = trained_state()
  for step in (1, 2, 3, 4):
    assert ckpt.save(step, state.replace(step=jnp.int32(step)))
  assert ckpt.all_steps() == [3, 4]
  assert sorted(p.name for p in pathlib.Path(ckpt_dir).iterdir() if p.name.isdigit()) == ['3', '4']
  assert not ckpt.save(4, state)  # already saved: skipped, nothing overwritten
  _, _, step = ckpt.restore(abstract_of(make_init()))
  assert step == 4
  _, _, step = ckpt.restore(abstract_of(make_init()), step=3)
  assert step == 3
  with pytest.raises(ValueError, match=r'No checkpoint for step 1 .* available steps: \[3, 4\]'):
    ckpt.restore(abstract_of(make_init()), step=1)
  ckpt.close()


def test_shape_mismatch_names_parameter_and_fix(ckpt_dir):
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  ckpt.save(1, trained_state(features=16))
  with pytest.raises(ValueError) as info:
    ckpt.restore(abstract_of(make_init(features=32)))
  message = str(info.value)
  # Leaves are checked in sorted path order: ema_params come before opt_state and params.
  assert "'ema_params/hidden/bias'" in message
  assert '(16,) in the checkpoint' in message and 'expects (32,)' in message
  assert 'use the config the checkpoint was trained with' in message.lower()
  assert '--workdir' in message
  ckpt.close()


def test_abstract_state_without_shardings_is_rejected(ckpt_dir):
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  ckpt.save(1, trained_state())
  with pytest.raises(ValueError, match=r"'ema_params/hidden/bias' has no sharding"):
    ckpt.restore(jax.eval_shape(make_init(), jax.random.key(0)))
  ckpt.close()


def test_other_optimizer_structure_is_named(ckpt_dir):
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  ckpt.save(1, trained_state())
  model, tx = MLP(), optax.sgd(0.1)

  def init_sgd(key):
    params = model.init(key, jnp.zeros((1, 5)))['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=tx.init(params), apply_fn=model.apply, tx=tx)
  with pytest.raises(ValueError, match=r"arrays the model does not, first 'opt_state/0/count'"):
    ckpt.restore(abstract_of(init_sgd))
  ckpt.close()


def _truncate(step_dir):
  with open(largest_data_file(step_dir), 'r+b') as f:
    f.truncate(10)


def _delete(step_dir):
  os.remove(largest_data_file(step_dir))


def _flip_byte(step_dir):
  # Inside a compressed chunk: tensorstore reads it back without error, the fingerprint catches it.
  path = largest_data_file(step_dir)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


def _delete_metadata(step_dir):
  os.remove(step_dir / 'state' / '_METADATA')
  os.remove(step_dir / 'state' / 'manifest.ocdbt')


@pytest.mark.parametrize('corrupt', [_truncate, _delete, _flip_byte, _delete_metadata])
def test_corrupted_latest_falls_back_to_previous(ckpt_dir, corrupt):
  ckpt = checkpointing.Checkpointer(ckpt_dir, max_to_keep=3)
  # 256 hidden units: arrays above orbax's 1 KiB inline limit, so they live in data files.
  good, bad = trained_state(seed=1, features=256), trained_state(seed=2, features=256)
  ckpt.save(1, good, data_state={'i': 1})
  ckpt.save(2, bad, data_state={'i': 2})
  step_dir = pathlib.Path(ckpt_dir) / '2'
  corrupt(step_dir)

  warning = checkpointing.logging.warning
  with mock.patch.object(checkpointing.logging, 'warning', wraps=warning) as w:
    restored, data_state, step = ckpt.restore(abstract_of(make_init(features=256)))
  assert step == 1 and data_state == {'i': 1}
  assert_bitwise_equal(restored, good)
  warned = ' '.join(' '.join(map(str, c.args)) for c in w.call_args_list)
  assert str(step_dir) in warned and 'corrupted' in warned
  # The damaged step is kept for inspection but out of the way, so step 2 can be saved again.
  assert not step_dir.exists()
  assert any(p.name.startswith('2.corrupt-') for p in pathlib.Path(ckpt_dir).iterdir())
  assert ckpt.latest_step() == 1
  assert ckpt.save(2, bad)
  assert ckpt.restore(abstract_of(make_init(features=256)))[2] == 2
  ckpt.close()


def test_no_good_checkpoint_raises_with_paths(ckpt_dir):
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  ckpt.save(1, trained_state(features=256))
  ckpt.save(2, trained_state(features=256))
  for step in ('1', '2'):
    _truncate(pathlib.Path(ckpt_dir) / step)
  with pytest.raises(checkpointing.CheckpointCorruptedError) as info:
    ckpt.restore(abstract_of(make_init(features=256)))
  assert str(pathlib.Path(ckpt_dir) / '1') in str(info.value)
  assert str(pathlib.Path(ckpt_dir) / '2') in str(info.value)
  ckpt.close()


def test_explicit_corrupted_step_does_not_fall_back(ckpt_dir):
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  ckpt.save(1, trained_state(features=256))
  ckpt.save(2, trained_state(features=256))
  _truncate(pathlib.Path(ckpt_dir) / '2')
  corrupted = str(pathlib.Path(ckpt_dir) / '2')
  with pytest.raises(checkpointing.CheckpointCorruptedError, match=corrupted):
    ckpt.restore(abstract_of(make_init(features=256)), step=2)
  assert ckpt.all_steps() == [1, 2]  # nothing moved: the caller asked for this step explicitly
  ckpt.close()


def test_interrupted_write_is_invisible(ckpt_dir):
  # What a crash mid-save leaves behind: orbax's temporary directory, never renamed to '3'.
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  ckpt.save(2, trained_state())
  ckpt.close()
  tmp = pathlib.Path(ckpt_dir) / '3.orbax-checkpoint-tmp-1700000000000'
  (tmp / 'state').mkdir(parents=True)
  (tmp / 'state' / 'garbage').write_bytes(b'half a checkpoint')
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  assert ckpt.latest_step() == 2
  assert ckpt.restore(abstract_of(make_init()))[2] == 2
  ckpt.close()


def test_save_is_atomic_rename(ckpt_dir, monkeypatch):
  """Checks that a step's files are written under a temporary name and appear only when complete."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  seen = []
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def spy(self):
    seen.append((self.get().name, (pathlib.Path(ckpt_dir) / '1').exists()))
    await original(self)
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', spy)
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  ckpt.save(1, trained_state())
  ckpt.close()
  assert seen and all('orbax-checkpoint-tmp' in name for name, _ in seen)
  assert not any(final_exists for _, final_exists in seen)
  assert (pathlib.Path(ckpt_dir) / '1' / 'commit_success.txt').exists()


def test_non_finite_params_are_not_saved(ckpt_dir):
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  assert ckpt.save(1, trained_state())
  state = trained_state()
  for field in ('params', 'ema_params'):
    poisoned = jax.tree.map(lambda x: x.at[0].set(jnp.nan), getattr(state, field))
    bad = state.replace(**{field: poisoned})
    with mock.patch.object(checkpointing.logging, 'error') as error:
      assert not ckpt.save(2, bad)
    assert 'NaN or Inf' in error.call_args.args[0]
  assert ckpt.all_steps() == [1]
  ckpt.close()


def test_failed_background_save_never_deletes_last_good(ckpt_dir, monkeypatch):
  """Retention runs after a background save even when orbax only logs its failure; step 1 stays.

  Simulated: the commit (rename) of step 2 silently does nothing and the error surfaces only via
  `check_for_errors`, which orbax's finalize logs ("Skipping finalization") before deleting old
  steps. With `LatestN(1)` alone, step 1 -- the only good checkpoint -- would be deleted.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  ckpt = checkpointing.Checkpointer(ckpt_dir, max_to_keep=1, async_save=True)
  assert ckpt.save(1, trained_state())
  ckpt.wait_until_finished()

  async def lost_commit(self):
    del self
  def report_error(self):
    raise OSError('disk full (simulated)')
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', lost_commit)
  monkeypatch.setattr(ocp.AsyncCheckpointer, 'check_for_errors', report_error)
  assert ckpt.save(2, trained_state(seed=3))
  ckpt.wait_until_finished()
  monkeypatch.undo()
  assert (pathlib.Path(ckpt_dir) / '1').exists()
  assert not (pathlib.Path(ckpt_dir) / '2').exists()
  fresh = checkpointing.Checkpointer(ckpt_dir)
  assert fresh.restore(abstract_of(make_init()))[2] == 1
  fresh.close()
  ckpt.close()


def test_resharding_restore_on_8_devices(tmp_path):
  """Saves from an (8, 1) mesh and from an fsdp-sharded (2, 4) mesh; restores onto others."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  code = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {os.path.dirname(__file__)!r})
      import jax, numpy as np
      from jax.sharding import PartitionSpec as P
      from diffusion_jax import checkpointing, sharding
      import test_checkpointing as t
      assert jax.device_count() == 8
      init = t.make_init(features=64)
      state = t.trained_state(features=64)

      def abstract_on(mesh):
        shardings = sharding.param_sharding(jax.eval_shape(init, jax.random.key(0)), mesh,
                                            min_size=64)
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(init, jax.random.key(0)), shardings)

      for save_mesh in [(8, 1), (2, 4)]:
        directory = {str(tmp_path)!r} + '/' + str(save_mesh)
        mesh = sharding.make_mesh(data=save_mesh[0], fsdp=save_mesh[1])
        placed = jax.device_put(state, sharding.param_sharding(state, mesh, min_size=64))
        ckpt = checkpointing.Checkpointer(directory)
        assert ckpt.save(5, placed, data_state={{'mesh': list(save_mesh)}})
        ckpt.close()
        for target in [(4, 2), (1, 1)]:
          devices = jax.devices()[:target[0] * target[1]]
          tmesh = sharding.make_mesh(data=target[0], fsdp=target[1], devices=devices)
          restored, data, step = checkpointing.Checkpointer(directory).restore(abstract_on(tmesh))
          assert step == 5 and data == {{'mesh': list(save_mesh)}}
          kernel = restored.params['hidden']['kernel']  # [5, 64]
          assert kernel.sharding.mesh.shape == tmesh.shape, kernel.sharding
          if target == (4, 2):
            assert kernel.sharding.spec == P(None, 'fsdp'), kernel.sharding.spec
            assert len(kernel.addressable_shards) == 8
          t.assert_bitwise_equal(restored, state)
          # The EMA parameters alone, straight onto the target mesh's shardings.
          ema = checkpointing.load_params(directory, abstract_on(tmesh).ema_params)
          assert ema['hidden']['kernel'].sharding == kernel.sharding, ema['hidden']['kernel']
          t.assert_bitwise_equal(ema, state.ema_params)
      print('OK')
  """)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, '-c', code], env=env, cwd=repo, capture_output=True,
                          text=True, timeout=180)
  assert result.returncode == 0, result.stdout + result.stderr[-5000:]
  assert 'OK' in result.stdout


# --- Parameters alone: restore_params, load_params, check_tree, frozen trees. ---------------------

def _ocdbt(step_dir: pathlib.Path):
  """The key-value store (OCDBT) holding every array of the step's state item, one key per chunk."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  return ts.KvStore.open({'driver': 'ocdbt', 'base': f'file://{step_dir / "state"}/'}).result()


def _delete_arrays(step_dir: pathlib.Path, prefix: str) -> None:
  """Deletes every array under `prefix` (`'opt_state'`): its zarr header and its chunks."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  kv = _ocdbt(step_dir)
  kv.delete_range(ts.KvStore.KeyRange(f'{prefix}.'.encode(), f'{prefix}/'.encode())).result()
  assert not [k for k in kv.list().result() if k.startswith(f'{prefix}.'.encode())]


def test_restore_params_is_bitwise_and_reads_no_optimizer_state(ckpt_dir):
  state = trained_state(features=256)
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  assert ckpt.restore_params(abstract_of(make_init()).ema_params) is None  # nothing saved yet
  ckpt.save(1, state)
  # Adam's moments and the raw params are gone from disk, headers and data: only EMA is left.
  for prefix in ('opt_state', 'params'):
    _delete_arrays(pathlib.Path(ckpt_dir) / '1', prefix)
  abstract = abstract_of(make_init(features=256))
  ema_params, step = ckpt.restore_params(abstract.ema_params)
  assert step == 1
  assert_bitwise_equal(ema_params, state.ema_params)
  assert ema_params['out']['kernel'].sharding == abstract.ema_params['out']['kernel'].sharding
  # The deletion bites for anything that does read them (whichever array orbax opens first).
  with pytest.raises(checkpointing.CheckpointCorruptedError,
                     match=r'"(opt_state|params)\.[\w.]+/\.zarray" .* does not exist'):
    ckpt.restore(abstract, step=1)
  ckpt.close()


def test_restore_params_which_and_explicit_step(ckpt_dir):
  first, second = trained_state(seed=1), trained_state(seed=2)
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  ckpt.save(1, first)
  ckpt.save(2, second)
  abstract = abstract_of(make_init())
  params, step = ckpt.restore_params(abstract.params, which='params')
  assert step == 2
  assert_bitwise_equal(params, second.params)
  ema_params, step = ckpt.restore_params(abstract.ema_params, step=1)
  assert step == 1
  assert_bitwise_equal(ema_params, first.ema_params)
  with pytest.raises(ValueError, match=r"no 'adam' subtree .* \['ema_params', 'opt_state', "
                                       r"'params', 'step'\]"):
    ckpt.restore_params(abstract.params, which='adam')
  with pytest.raises(ValueError, match=r"abstract_params leaf 'ema_params/hidden/bias' has no "
                                       'sharding'):
    ckpt.restore_params(jax.eval_shape(make_init(), jax.random.key(0)).ema_params)
  with pytest.raises(ValueError, match=r'No checkpoint for step 3 .* available steps: \[1, 2\]'):
    ckpt.restore_params(abstract.ema_params, step=3)
  ckpt.close()


def _truncate_every_data_file(step_dir):
  # Every chunk file: which one holds the EMA arrays depends on orbax's write order.
  for path in step_dir.glob('state/ocdbt.process_*/d/*'):
    with open(path, 'r+b') as f:
      f.truncate(10)


def _delete_every_data_file(step_dir):
  for path in step_dir.glob('state/ocdbt.process_*/d/*'):
    os.remove(path)


def _swap_ema_chunk(step_dir):
  # A well-formed chunk holding other numbers (the raw params'): read back without any error,
  # only the fingerprint tells.
  kv = _ocdbt(step_dir)
  kv.write(b'ema_params.hidden.kernel/0.0', kv.read(b'params.hidden.kernel/0.0').result().value
           ).result()


def _garbage_ema_chunk(step_dir):
  _ocdbt(step_dir).write(b'ema_params.hidden.kernel/0.0', b'not a compressed chunk').result()


def _delete_integrity(step_dir):
  os.remove(step_dir / 'integrity' / 'metadata')


@pytest.mark.parametrize('corrupt', [_truncate_every_data_file, _delete_every_data_file,
                                     _delete_metadata, _swap_ema_chunk, _garbage_ema_chunk,
                                     _delete_integrity])
def test_restore_params_falls_back_from_damaged_step(ckpt_dir, corrupt):
  ckpt = checkpointing.Checkpointer(ckpt_dir, max_to_keep=3)
  good, bad = trained_state(seed=1, features=256), trained_state(seed=2, features=256)
  ckpt.save(1, good)
  ckpt.save(2, bad)
  step_dir = pathlib.Path(ckpt_dir) / '2'
  corrupt(step_dir)
  abstract = abstract_of(make_init(features=256)).ema_params

  warning = checkpointing.logging.warning
  with mock.patch.object(checkpointing.logging, 'warning', wraps=warning) as w:
    ema_params, step = ckpt.restore_params(abstract)
  assert step == 1
  assert_bitwise_equal(ema_params, good.ema_params)
  warned = ' '.join(' '.join(map(str, c.args)) for c in w.call_args_list)
  assert str(step_dir) in warned and 'corrupted' in warned
  # Quarantined as restore does, so step 2 can be saved again.
  assert not step_dir.exists()
  assert any(p.name.startswith('2.corrupt-') for p in pathlib.Path(ckpt_dir).iterdir())
  assert ckpt.save(2, bad)
  assert ckpt.restore_params(abstract)[1] == 2
  ckpt.close()


def test_restore_params_explicit_damaged_step_raises(ckpt_dir):
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  ckpt.save(1, trained_state(features=256))
  ckpt.save(2, trained_state(features=256))
  _swap_ema_chunk(pathlib.Path(ckpt_dir) / '2')
  with pytest.raises(checkpointing.CheckpointCorruptedError,
                     match=r"'ema_params/hidden/kernel' does not match the fingerprint"):
    ckpt.restore_params(abstract_of(make_init(features=256)).ema_params, step=2)
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


def _listing(directory) -> list[str]:
  return sorted(str(p.relative_to(directory)) for p in pathlib.Path(directory).rglob('*'))


def test_load_params_from_checkpoints_dir_and_step_dir(ckpt_dir):
  first, second = trained_state(seed=1, features=256), trained_state(seed=2, features=256)
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  ckpt.save(1, first)
  ckpt.save(2, second)
  ckpt.close()
  abstract = abstract_of(make_init(features=256))
  before = _listing(ckpt_dir)
  assert_bitwise_equal(checkpointing.load_params(ckpt_dir, abstract.ema_params), second.ema_params)
  assert_bitwise_equal(checkpointing.load_params(pathlib.Path(ckpt_dir) / '1', abstract.ema_params),
                       first.ema_params)
  assert_bitwise_equal(checkpointing.load_params(ckpt_dir, abstract.params, which='params'),
                       second.params)
  # A damaged newest step is skipped, and left where it is: load_params never writes.
  _truncate_every_data_file(pathlib.Path(ckpt_dir) / '2')
  assert_bitwise_equal(checkpointing.load_params(ckpt_dir, abstract.ema_params), first.ema_params)
  damaged = pathlib.Path(ckpt_dir) / '2'
  with pytest.raises(checkpointing.CheckpointCorruptedError, match=str(damaged)):
    checkpointing.load_params(damaged, abstract.ema_params)
  assert _listing(ckpt_dir) == before


def test_load_params_from_nothing_raises_file_not_found(tmp_path):
  abstract = abstract_of(make_init()).ema_params
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpointing.load_params(tmp_path / 'nowhere', abstract)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match=r"No checkpoint in .*empty: expected a run's "
                                              'checkpoints/ directory'):
    checkpointing.load_params(tmp_path / 'empty', abstract)
  # A workdir instead of its checkpoints/ directory: the message says which path was meant.
  ckpt = checkpointing.Checkpointer(tmp_path / 'run' / 'checkpoints')
  ckpt.save(1, trained_state())
  ckpt.close()
  with pytest.raises(FileNotFoundError, match='did you mean .*run/checkpoints'):
    checkpointing.load_params(tmp_path / 'run', abstract)
  # A save that never finished.
  tmp = pathlib.Path(tmp_path / 'run' / 'checkpoints' / '3.orbax-checkpoint-tmp-1700000000000')
  (tmp / 'state').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='never finished'):
    checkpointing.load_params(tmp, abstract)


def _mismatching_trees():
  """(abstract params the model expects, regex of the message naming the first mismatch)."""
  params = jax.eval_shape(make_init(features=16), jax.random.key(0)).params
  wider = jax.eval_shape(make_init(features=32), jax.random.key(0)).params
  missing = {**params, 'extra': {'kernel': jax.ShapeDtypeStruct((2, 2), jnp.float32)}}
  extra = {'out': params['out']}
  half = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
  return [
      pytest.param(wider, r"'{name}/hidden/bias' is \(16,\) float32 in the {label} but the model "
                   r'expects \(32,\) float32', id='shape'),
      pytest.param(missing, r"'{name}/extra/kernel' is missing from the {label} \(the model "
                   r'expects \(2, 2\) float32\)', id='missing'),
      pytest.param(extra, r"the {label} has '{name}/hidden/bias', \(16,\) float32, which the "
                   'model does not', id='extra'),
      pytest.param(half, r"'{name}/hidden/bias' is \(16,\) float32 in the {label} but the model "
                   r'expects \(16,\) bfloat16', id='dtype'),
  ]


@pytest.mark.parametrize('expected,message', _mismatching_trees())
def test_check_tree_names_first_mismatch(expected, message):
  state = trained_state(features=16)
  checkpointing.check_tree(jax.eval_shape(lambda: state.params), state.params)  # agrees
  with pytest.raises(ValueError, match=message.format(name='params', label='params tree')):
    checkpointing.check_tree(expected, state.params)
  with pytest.raises(ValueError, match=message.format(name='init', label='init tree')):
    checkpointing.check_tree(expected, flax.core.freeze(state.params), name='init')


@pytest.mark.parametrize('expected,message', _mismatching_trees())
def test_load_params_into_other_model_names_first_mismatch(ckpt_dir, expected, message):
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  ckpt.save(1, trained_state(features=16))
  ckpt.close()
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          expected)
  with pytest.raises(ValueError, match=message.format(name='ema_params', label='checkpoint')
                     ) as info:
    checkpointing.load_params(ckpt_dir, abstract)
  assert str(pathlib.Path(ckpt_dir) / '1') in str(info.value)
  assert 'the model it was trained with' in str(info.value)


def test_restore_params_from_checkpoint_without_shape_record(ckpt_dir):
  """Checkpoints written before the integrity record held shapes: orbax's metadata is used."""
  real_record = checkpointing._record  # pylint: disable=protected-access

  def old_record(tree_dict, fingerprints):
    return {'fingerprints': real_record(tree_dict, fingerprints)['fingerprints']}
  state = trained_state()
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  with mock.patch.object(checkpointing, '_record', old_record):
    ckpt.save(1, state)
  assert 'arrays' not in (pathlib.Path(ckpt_dir) / '1' / 'integrity' / 'metadata').read_text()
  ema_params, step = ckpt.restore_params(abstract_of(make_init()).ema_params)
  assert step == 1
  assert_bitwise_equal(ema_params, state.ema_params)
  with pytest.raises(ValueError, match=r"'ema_params/hidden/bias' is \(16,\) float32 in the "
                                       r'checkpoint but the model expects \(32,\) float32'):
    ckpt.restore_params(abstract_of(make_init(features=32)).ema_params)
  ckpt.close()


def test_frozen_saved_only_when_given_and_restored_alone(ckpt_dir):
  state = trained_state()
  frozen = {'autoencoder': trained_state(seed=7, features=8).params, 'scale': jnp.float32(0.18)}
  abstract_frozen = abstract_of(lambda key: frozen)
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  ckpt.save(1, state)
  assert not (pathlib.Path(ckpt_dir) / '1' / 'frozen').exists()
  ckpt.save(2, state, frozen=frozen)
  assert (pathlib.Path(ckpt_dir) / '2' / 'frozen').is_dir()

  restored, step = ckpt.restore_frozen(abstract_frozen)
  assert step == 2
  assert_bitwise_equal(restored, frozen)
  with pytest.raises(ValueError, match=r"/1 holds no 'frozen' item"):
    ckpt.restore_frozen(abstract_frozen, step=1)
  with pytest.raises(ValueError, match=r"'frozen/autoencoder/hidden/bias' is \(8,\) float32 in "
                                       r'the checkpoint but the model expects \(16,\)'):
    ckpt.restore_frozen({**abstract_frozen, 'autoencoder': abstract_of(make_init()).params})
  # The state and the parameters restore as before, the frozen trees untouched.
  restored_state, _, step = ckpt.restore(abstract_of(make_init()))
  assert step == 2
  assert_bitwise_equal(restored_state, state)
  assert_bitwise_equal(ckpt.restore_params(abstract_of(make_init()).ema_params)[0],
                       state.ema_params)
  ckpt.close()


def test_frozen_damage_is_detected(ckpt_dir):
  frozen = {'autoencoder': trained_state(seed=7, features=256).params}
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  ckpt.save(1, trained_state(), frozen=frozen)
  step_dir = pathlib.Path(ckpt_dir) / '1'
  path = max(step_dir.glob('frozen/ocdbt.process_*/d/*'), key=lambda p: p.stat().st_size)
  with open(path, 'r+b') as f:
    f.truncate(10)
  with pytest.raises(checkpointing.CheckpointCorruptedError, match=str(step_dir)):
    ckpt.restore_frozen(abstract_of(lambda key: frozen))
  # The state item is intact, and restores.
  assert ckpt.restore(abstract_of(make_init()))[2] == 1
  ckpt.close()
