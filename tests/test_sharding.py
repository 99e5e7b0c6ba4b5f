"""Tests for diffusion_jax.sharding.

Multi-device checks run in a subprocess with 8 forced CPU devices: XLA reads
`--xla_force_host_platform_device_count` once, when the backend starts, so it cannot be set from a
test in a process where another test module has already used jax.
"""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from diffusion_jax import sharding


def run_with_devices(code: str, *, num_devices: int = 8, timeout: float = 120.0) -> str:
  """Runs `code` in a fresh Python with `num_devices` CPU devices; returns its stdout."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, f'subprocess failed:\n{result.stdout}\n{result.stderr}'
  return result.stdout


def test_mesh_size_mismatch_names_fields_and_fix():
  one_device = jax.devices()[:1]
  with pytest.raises(ValueError, match=r'mesh\.data \* mesh\.fsdp.*1 devices.*mesh\.data=-1'):
    sharding.make_mesh(data=2, fsdp=1, devices=one_device)
  with pytest.raises(ValueError, match=r'mesh\.fsdp=2 does not divide the 1'):
    sharding.make_mesh(fsdp=2, devices=one_device)


def test_single_device_mesh_replicates_everything():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 1}
  tree = {'w': jax.ShapeDtypeStruct((256, 256), 'float32')}
  assert sharding.param_sharding(tree, mesh)['w'].spec == jax.sharding.PartitionSpec()


def test_check_batch_size_names_the_field():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  sharding.check_batch_size(7, mesh)  # one device: anything goes
  fake = type('FakeMesh', (), {'devices': jax.numpy.zeros((4, 2)), 'shape': {'data': 4, 'fsdp': 2}})
  with pytest.raises(ValueError, match=r'training\.batch_size=12 .* 8 devices'):
    sharding.check_batch_size(12, fake())


def test_meshes_and_fsdp_axis_choice_on_8_devices():
  out = run_with_devices("""
      import jax
      from jax.sharding import PartitionSpec as P
      from diffusion_jax import sharding
      assert jax.device_count() == 8
      for data, fsdp in [(8, 1), (4, 2), (2, 4), (-1, 4)]:
        mesh = sharding.make_mesh(data=data, fsdp=fsdp)
        assert mesh.axis_names == ('data', 'fsdp')
        assert mesh.devices.size == 8
      try:
        sharding.make_mesh(data=3, fsdp=2)
        raise AssertionError('no error')
      except ValueError as e:
        assert 'mesh.data' in str(e) and '8 devices' in str(e), e

      mesh = sharding.make_mesh(data=2, fsdp=4)
      S = jax.ShapeDtypeStruct
      tree = {
          'kernel': S((512, 1024), 'float32'),   # largest dim 1 divisible by 4
          'odd': S((1026, 256), 'float32'),      # largest dim 0 not divisible -> dim 1
          'conv': S((3, 3, 128, 64), 'float32'), # 3*3*128*64 >= 2**14 -> dim 2
          'bias': S((1024,), 'float32'),          # < min_size -> replicated
          'prime': S((131, 257), 'float32'),      # nothing divisible -> replicated
          'step': S((), 'int32'),
      }
      specs = {k: v.spec for k, v in sharding.param_sharding(tree, mesh).items()}
      assert specs == {'kernel': P(None, 'fsdp'), 'odd': P(None, 'fsdp'),
                       'conv': P(None, None, 'fsdp', None), 'bias': P(), 'prime': P(),
                       'step': P()}, specs
      mesh81 = sharding.make_mesh(data=8, fsdp=1)
      assert sharding.param_sharding(tree, mesh81)['kernel'].spec == P()
      sharding.check_batch_size(16, mesh)
      try:
        sharding.check_batch_size(12, mesh)
        raise AssertionError('no error')
      except ValueError as e:
        assert 'training.batch_size=12' in str(e), e
      print('OK')
  """)
  assert 'OK' in out


def test_sharded_sgd_step_matches_single_device():
  out = run_with_devices("""
      import jax, jax.numpy as jnp, numpy as np, optax
      from jax.sharding import PartitionSpec as P
      import flax.linen as nn
      from flax import struct
      from diffusion_jax import sharding

      class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
          x = nn.gelu(nn.Dense(64)(x))
          return nn.Dense(8)(x)

      class State(struct.PyTreeNode):
        step: jax.Array
        params: dict
        opt_state: optax.OptState
        apply_fn: object = struct.field(pytree_node=False)
        tx: object = struct.field(pytree_node=False)

      model, tx = MLP(), optax.sgd(0.1)
      def init(key):
        params = model.init(key, jnp.zeros((1, 32)))['params']
        return State(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     apply_fn=model.apply, tx=tx)

      def train_step(state, batch):
        def loss_fn(p):
          pred = state.apply_fn({'params': p}, batch['x'])
          return jnp.mean((pred - batch['y']) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), loss

      rng = np.random.default_rng(0)
      local = {'x': rng.normal(size=(16, 32)).astype(np.float32),
               'y': rng.normal(size=(16, 8)).astype(np.float32)}
      key = jax.random.key(0)

      # Reference: everything on one device.
      ref_state = jax.device_put(init(key), jax.devices()[0])
      ref_batch = jax.device_put(local, jax.devices()[0])
      for _ in range(3):
        ref_state, ref_loss = jax.jit(train_step)(ref_state, ref_batch)

      mesh = sharding.make_mesh(data=4, fsdp=2)
      # min_size=256 so the 32x64 and 64x8 kernels really are fsdp-sharded.
      abstract = jax.eval_shape(init, key)
      shardings = sharding.param_sharding(abstract, mesh, min_size=256)
      state = jax.jit(init, out_shardings=shardings)(key)
      assert state.params['Dense_0']['kernel'].sharding.spec == P(None, 'fsdp')
      batch = sharding.global_batch(local, mesh)
      assert batch['x'].sharding.spec == P(('data', 'fsdp'))
      assert len(batch['x'].addressable_shards) == 8
      step = jax.jit(train_step, out_shardings=(shardings, sharding.replicated(mesh)),
                     donate_argnums=(0,))
      for _ in range(3):
        state, loss = step(state, batch)
      assert state.params['Dense_0']['kernel'].sharding.spec == P(None, 'fsdp')
      # 1e-6, not bitwise: the sharded step sums the per-device partial gradients in a different
      # order (all-reduce / reduce-scatter) than the single-device reduction; float32 addition is
      # not associative, so results differ in the last bits (~1e-7 relative) but not more.
      for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)
      np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
      assert int(state.step) == 3

      # create_sharded_state: born sharded with the default min_size (all small -> replicated).
      state2, shardings2 = sharding.create_sharded_state(init, mesh, key)
      assert state2.params['Dense_0']['kernel'].sharding == shardings2.params['Dense_0']['kernel']
      assert state2.apply_fn == model.apply  # static fields pass through
      print('OK')
  """)
  assert 'OK' in out
