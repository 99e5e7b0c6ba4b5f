"""Objectives, frozen trees and partial training: what trains, what stays bitwise, what is stored.

- ``objectives.drop_cond`` replaces a whole example's cond leaf by leaf, with the old trainer's
  label-dropout draw for class labels (the reference is that formula).
- A frozen tree read by the loss stays bitwise unchanged through jitted, donated steps while the
  params learn from it, and the optimizer state holds nothing for it.
- ``optim.make_optimizer(trainable=...)``: masked-out leaves stay bitwise unchanged, have no Adam
  moments, and do not enter the clipping norm (the trainable leaves' updates are bitwise those of
  an optimizer that only ever saw them); the partitioned state round-trips through a checkpoint.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import checkpointing, objectives, optim, processes, sharding
from diffusion_jax.training import step as step_lib
from diffusion_jax.training.state import TrainState


def _bitwise_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).shape == np.asarray(y).shape
      and np.array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                         np.asarray(y).reshape(-1).view(np.uint8)) for x, y in zip(la, lb))


# --- condition dropout ---------------------------------------------------------------------------


def test_drop_cond_on_labels_is_the_old_label_dropout():
  """Class labels: the draw and the result of the old trainer's
  ``jnp.where(bernoulli(k, p, y.shape), num_classes, y)``."""
  y = jnp.arange(64, dtype=jnp.int32) % 10
  key = jax.random.PRNGKey(3)
  got = objectives.drop_cond(key, {'label': y}, {'label': 10}, 0.3, 64)['label']
  want = jnp.where(jax.random.bernoulli(key, 0.3, y.shape), 10, y)
  assert got.dtype == jnp.int32 and _bitwise_equal(got, want)
  assert 0 < int(jnp.sum(got == 10)) < 64


def test_drop_cond_drops_every_leaf_of_an_example_together():
  b, length, dim = 4000, 3, 2
  key = jax.random.PRNGKey(0)
  cond = {'label': jnp.zeros((b,), jnp.int32),
          'context': jnp.ones((b, length, dim), jnp.float32)}
  null = {'label': 7, 'context': jnp.full((1, length, dim), -1.0)}  # broadcasts against [B, L, D]
  out = objectives.drop_cond(key, cond, null, 0.25, b)
  dropped_label = np.asarray(out['label'] == 7)
  dropped_context = np.asarray(out['context'] == -1.0)
  assert dropped_context.all(axis=(1, 2)).tolist() == dropped_label.tolist()  # all or nothing...
  assert (~dropped_context).all(axis=(1, 2)).tolist() == (~dropped_label).tolist()  # per example
  assert out['context'].dtype == jnp.float32 and out['context'].shape == (b, length, dim)
  # Bernoulli(0.25) over 4000 examples: 1000 +- 27 (1 sigma).
  assert abs(dropped_label.sum() - 1000) < 5 * 27


def test_denoising_checks_its_dropout_arguments():
  process = processes.DiscreteVP.linear(num_timesteps=10)
  with pytest.raises(ValueError, match='needs cond_fn and null_cond'):
    objectives.denoising(network_fn=lambda *a, **k: None, process=process, cond_dropout=0.1)
  with pytest.raises(ValueError, match=r'\[0, 1\)'):
    objectives.denoising(network_fn=lambda *a, **k: None, process=process, cond_dropout=1.0,
                         cond_fn=lambda f, b: b, null_cond={})


def test_denoising_reads_cond_from_frozen_and_batch():
  """cond_fn(frozen, batch) decides what the network sees; the loss passes it untouched."""
  process = processes.DiscreteVP.linear(num_timesteps=10)
  seen = []

  def network_fn(params, x, c_noise, cond=None, *, train=False, rngs=None):
    del c_noise, train, rngs
    seen.append(cond)
    return x * params['w']

  table = jnp.array([2, 0, 1], jnp.int32)  # a frozen relabelling
  loss_fn = objectives.denoising(
      network_fn=network_fn, process=process,
      cond_fn=lambda frozen, batch: {'label': frozen['table'][batch['label']]})
  batch = {'x': jnp.ones((3, 2)), 'label': jnp.array([0, 1, 2])}
  loss, metrics = loss_fn({'w': jnp.float32(0.5)}, {'table': table}, batch, jax.random.PRNGKey(0))
  assert np.isfinite(float(loss)) and set(metrics) >= {'loss', 'mse', 'loss_q0'}
  np.testing.assert_array_equal(seen[-1]['label'], [2, 0, 1])


# --- frozen trees ---------------------------------------------------------------------------------


def _projection_problem(dim=4, n=64):
  """Learn w so that x @ w matches x @ frozen['proj'] (frozen: a fixed random linear map)."""
  rng = np.random.default_rng(0)
  frozen = {'proj': jnp.asarray(rng.normal(size=(dim, dim)), jnp.float32),
            'shift': jnp.asarray(rng.normal(size=(dim,)), jnp.float32)}
  params = {'w': jnp.zeros((dim, dim), jnp.float32), 'b': jnp.zeros((dim,), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)

  def loss_fn(params, frozen, batch, key):
    del key
    pred = batch['x'] @ params['w'] + params['b']
    target = batch['x'] @ frozen['proj'] + frozen['shift']
    loss = jnp.mean(jnp.square(pred - target))
    return loss, {'loss': loss}

  return params, frozen, {'x': x}, loss_fn


def test_frozen_tree_stays_bitwise_and_has_no_optimizer_state():
  params, frozen, batch, loss_fn = _projection_problem()
  mesh = sharding.make_mesh()
  frozen = sharding.put_params(frozen, mesh)  # as the trainer places it
  before = jax.device_get(frozen)
  tx = optim.make_optimizer(learning_rate=0.05)
  state = TrainState.create(params=params, tx=tx)
  step = jax.jit(functools.partial(step_lib.train_step, loss_fn=loss_fn, ema_decay=0.9),
                 donate_argnums=(0,))
  losses = []
  for _ in range(60):
    state, metrics = step(state, batch, jax.random.PRNGKey(0), frozen)
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.05 * losses[0], losses[::10]  # the params learned the frozen map
  assert int(metrics['skipped']) == 0
  assert _bitwise_equal(frozen, before)  # still readable (not donated) and unchanged
  # The optimizer state is Adam's over params only: its count(s) plus two moments per param.
  sizes = [x.size for x in jax.tree.leaves(state.opt_state)]
  num_params = sum(x.size for x in jax.tree.leaves(params))
  assert sum(s for s in sizes if s > 1) == 2 * num_params


# --- partial training of one tree -----------------------------------------------------------------


def _two_part_problem():
  """params {'a', 'b'}; the loss is a sum of a part in 'a' and a part in 'b' whose gradient is
  huge, so that clipping over both would shrink a's update."""
  rng = np.random.default_rng(1)
  params = {'a': {'kernel': jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
            'b': {'kernel': jnp.asarray(rng.normal(size=(5,)), jnp.float32)}}

  def loss_a(a):
    return jnp.sum(jnp.square(a['kernel'] - 1.0))

  def loss_fn(params, frozen, batch, key):
    del frozen, batch, key
    loss = loss_a(params['a']) + 1e6 * jnp.sum(jnp.square(params['b']['kernel']))
    return loss, {'loss': loss}

  return params, loss_a, loss_fn


@pytest.mark.parametrize('mask', ['callable', 'tree'])
def test_masked_leaves_stay_bitwise_have_no_moments_and_no_part_in_clipping(mask):
  params, loss_a, loss_fn = _two_part_problem()
  trainable = ((lambda path, leaf: path[0].key == 'a') if mask == 'callable' else
               {'a': {'kernel': True}, 'b': {'kernel': False}})
  # eps = 1: Adam's update then depends on the gradient's scale, so a clipping factor shows.
  opt = dict(learning_rate=0.1, eps=1.0, grad_clip=1.0)
  state = TrainState.create(params=params, tx=optim.make_optimizer(**opt, trainable=trainable))
  step = jax.jit(functools.partial(step_lib.train_step, loss_fn=loss_fn, ema_decay=0.5))
  # Reference: the same optimizer over the trainable part alone.
  tx_a = optim.make_optimizer(**opt)
  a, opt_state_a = params['a'], tx_a.init(params['a'])
  for _ in range(5):
    state, metrics = step(state, {}, jax.random.PRNGKey(0))
    updates, opt_state_a = tx_a.update(jax.grad(loss_a)(a), opt_state_a, a)
    a = optax.apply_updates(a, updates)
  assert float(metrics['grad_norm']) > 1e6  # the masked part's gradient is there, and huge
  assert _bitwise_equal(state.params['b'], params['b'])  # the masked leaf never moved
  assert not _bitwise_equal(state.params['a'], params['a'])
  np.testing.assert_allclose(state.params['a']['kernel'], a['kernel'], rtol=1e-6, atol=0)
  # No moments for the masked leaf: MaskedNode in its place, nothing of its shape stored.
  adam = [s for s in jax.tree.leaves(state.opt_state,
                                     is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  assert isinstance(adam[0].mu['b']['kernel'], optax.MaskedNode)
  assert isinstance(adam[0].nu['b']['kernel'], optax.MaskedNode)
  assert not any(x.shape == (5,) for x in jax.tree.leaves(state.opt_state))


def test_partitioned_optimizer_state_round_trips_a_checkpoint(tmp_path):
  params, _, loss_fn = _two_part_problem()
  tx = optim.make_optimizer(learning_rate=0.1, trainable=lambda path, leaf: path[0].key == 'a')
  mesh = sharding.make_mesh()
  state, shardings = sharding.create_sharded_state(
      lambda p: TrainState.create(params=p, tx=tx), mesh, params)
  state, _ = jax.jit(functools.partial(step_lib.train_step, loss_fn=loss_fn, ema_decay=0.5))(
      state, {}, jax.random.PRNGKey(0))
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  assert ckpt.save(1, state)
  abstract = sharding.with_shardings(jax.eval_shape(lambda: state), shardings)
  restored, _, step = ckpt.restore(abstract)
  ckpt.close()
  assert step == 1
  assert _bitwise_equal(restored.opt_state, state.opt_state)
  assert _bitwise_equal((restored.params, restored.ema_params), (state.params, state.ema_params))
