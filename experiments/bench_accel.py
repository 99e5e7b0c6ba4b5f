r"""Training-step throughput and MFU on an accelerator: the GPU/TPU measurements of issue 6.

    python experiments/bench_accel.py                 # CIFAR-10 DDPM U-Net, batch 128, all devices
    python experiments/bench_accel.py --smoke         # tiny U-Net, batch 8: checks the script (CPU)

Runs the trainer's own step (``training.builders.setup`` + ``training.step.train_step`` jitted as
``training.loop`` does: state donated, sharded over a mesh of all devices on ``data``) on
synthetic images, for each variant of compute dtype x ``nn.remat`` policy x attention
implementation (the model field ``model.unet.attention``), and prints one table:

- img/s: global batch / median seconds per step over ``--steps`` timed steps after ``--warmup``;
- TFLOP/s: XLA's cost analysis of the compiled step (FLOPs per step, all devices) / median time;
- MFU: model FLOPs (those of the variant without remat, same dtype: recomputation is not
  counted) per second over the devices' peak for the dtype (``PEAKS`` below, dense, or
  ``--peak_tflops``); HFU: the variant's own FLOPs (recomputation included) over the same peak.
  float32 matrix products run as TF32 on NVIDIA GPUs under JAX's default precision, so their
  MFU is against the TF32 peak;
- compile seconds, and XLA's memory estimate of the step (arguments + temporaries, per device);
  ``peak_bytes_in_use`` of device 0 after the variant, where the backend reports it (monotone over
  the run: the largest variant so far).

Attention: ``model.unet.attention`` of the variant: ``auto`` is the per-backend default
(``diffusion_jax.models.attention.default_implementation``), ``xla``, ``cudnn`` (GPU only),
``einsum`` or ``chunked`` name one implementation.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import tempfile
import time

from absl import app, flags

# The experiment configs at the repository root, loaded by path (no sys.path edit).
_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')

_BATCH = flags.DEFINE_integer('batch', 128, 'Global batch size.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per variant.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
_VARIANTS = flags.DEFINE_list(
    'variants',
    ['bfloat16/none/auto', 'bfloat16/full/auto', 'bfloat16/dots_saveable/auto',
     'float32/none/auto', 'bfloat16/none/xla', 'bfloat16/none/cudnn'],
    'dtype/remat_policy/attention triples.')
_PEAK = flags.DEFINE_float('peak_tflops', 0.0, 'Peak dense TFLOP/s per device for every variant '
                           '(0: from PEAKS by device kind and dtype).')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny U-Net, batch 8, 2 steps: a check of the script.')
_JSON = flags.DEFINE_string('json', '', 'Also write the rows to this file.')

# Dense peak TFLOP/s per device (vendor data sheets): (substring of device_kind, bf16, f32 path).
# NVIDIA: f32 matmuls/convs use TF32 tensor cores under JAX's default precision.
PEAKS = (
    ('H200', 989.4, 494.7),  # H200 SXM: bf16 989.4, TF32 494.7 (dense)
    ('H100', 989.4, 494.7),  # H100 SXM
    ('A100', 312.0, 156.0),
    ('TPU v4', 275.0, 275.0),  # TPU: f32 matmuls run as bf16 passes (default precision)
    ('TPU v5 lite', 197.0, 197.0),
    ('TPU v5', 459.0, 459.0),
    ('TPU v6', 918.0, 918.0),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  if _PEAK.value:
    return _PEAK.value
  for name, bf16, f32 in PEAKS:
    if name in device_kind:
      return bf16 if dtype == 'bfloat16' else f32
  return None


def _config(dtype: str, remat: str, attention: str):
  name = 'tiny' if _SMOKE.value else 'cifar'
  from diffusion_jax import configs  # pylint: disable=import-outside-toplevel
  config = configs.load(os.path.join(_CONFIGS, f'{name}.py')).get_config()
  config.data.source = 'digits'  # never read: the step gets synthetic images of the same shape
  config.data.num_channels = 3
  config.model.dtype = dtype
  config.model.unet.remat_policy = remat
  config.model.unet.attention = attention
  config.training.batch_size = _BATCH.value if not _SMOKE.value else 8
  return config


def run_variant(dtype: str, remat: str, attention: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel

  from diffusion_jax import sharding  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from diffusion_jax.training import builders, config as config_lib, step as step_lib

  config = _config(dtype, remat, attention)
  config_lib.validate_config(config)
  batch = config.training.batch_size
  shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
  with tempfile.TemporaryDirectory() as workdir:
    s = builders.setup(config, workdir, shape)
    task = builders.build_task(s)
    state = builders.fresh_state(s)
    data_sharding = NamedSharding(s.mesh, PartitionSpec(sharding.BATCH_AXES))
    x = jax.device_put(jax.random.uniform(jax.random.PRNGKey(1), (batch,) + shape,
                                          jnp.float32, -1.0, 1.0), data_sharding)
    # As training.loop: the loss and the static settings are closed over by the jitted step.
    step_fn = jax.jit(functools.partial(step_lib.train_step, loss_fn=task.loss_fn,
                                        ema_decay=config.training.ema_decay,
                                        lr_schedule=s.lr_schedule),
                      donate_argnums=(0,),
                      out_shardings=(s.state_shardings, sharding.replicated(s.mesh)))
    key = jax.random.PRNGKey(2)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, {'x': x}, key, task.frozen).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    flops = (cost or {}).get('flops')
    mem = compiled.memory_analysis()
    est_gib = ((mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**30) if mem else None
    # The step's key is fold_in(key, state.step): one key for every call.
    for _ in range(_WARMUP.value):
      state, metrics = compiled(state, {'x': x}, key, task.frozen)
    jax.block_until_ready(state)
    times = []
    steps = 2 if _SMOKE.value else _STEPS.value
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, {'x': x}, key, task.frozen)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t0)
    loss = float(metrics['loss'])
    s.checkpointer.close()
  med = statistics.median(times)
  devices = jax.devices()
  kind = devices[0].device_kind
  peak = peak_tflops(kind, dtype)
  achieved = flops / med / 1e12 if flops else None
  stats = devices[0].memory_stats() or {}
  return {
      'dtype': dtype, 'remat': remat, 'attention': attention, 'batch': batch,
      'devices': f'{len(devices)} x {kind}', 'img_s': batch / med, 's_per_step': med,
      'tflops': achieved, 'hfu': (achieved / (peak * len(devices))) if achieved and peak else None,
      'peak_tflops_per_device': peak, 'num_devices': len(devices), 'compile_s': compile_s,
      'xla_mem_gib_per_device': est_gib,
      'peak_bytes_in_use_gib': stats.get('peak_bytes_in_use', 0) / 2**30 or None,
      'gflop_per_step': flops / 1e9 if flops else None, 'loss': loss,
  }


def _fmt(v, spec):
  return 'n/a' if v is None else format(v, spec)


def main(argv) -> None:
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  print(f'bench_accel: jax {jax.__version__}, backend {jax.default_backend()}, '
        f'{jax.device_count()} x {jax.devices()[0].device_kind}', flush=True)
  rows = []
  for variant in _VARIANTS.value:
    dtype, remat, attention = variant.split('/')
    if attention == 'cudnn' and jax.default_backend() != 'gpu':
      print(f'  {variant}: skipped (cuDNN attention runs on NVIDIA GPUs only)', flush=True)
      continue
    try:
      row = run_variant(dtype, remat, attention)
    except Exception as e:  # pylint: disable=broad-except
      # One variant failing (e.g. cuDNN attention unavailable) must not lose the others.
      print(f'  {variant}: FAILED {type(e).__name__}: {str(e)[:300]}', flush=True)
      continue
    rows.append(row)
    print(f'  {variant}: {json.dumps(row)}', flush=True)
  # Model FLOPs per dtype: the step without remat (recomputed FLOPs are not useful work).
  model_gflop = {r['dtype']: r['gflop_per_step'] for r in rows if r['remat'] == 'none'}
  for r in rows:
    gflop, peak = model_gflop.get(r['dtype'], r['gflop_per_step']), r['peak_tflops_per_device']
    r['mfu'] = (gflop / 1e3 / r['s_per_step'] / (peak * r['num_devices'])
                if gflop and peak else None)
  print('\n| dtype | remat | attention | img/s | s/step | TFLOP/s | MFU | HFU | GFLOP/step | '
        'compile s | XLA mem GiB/dev | peak in use GiB |\n|' + '---|' * 12)
  for r in rows:
    print(f'| {r["dtype"]} | {r["remat"]} | {r["attention"]} | {r["img_s"]:.1f} | '
          f'{r["s_per_step"]:.4f} | {_fmt(r["tflops"], ".3g")} | {_fmt(r["mfu"], ".1%")} | '
          f'{_fmt(r["hfu"], ".1%")} | {_fmt(r["gflop_per_step"], ".4g")} | {r["compile_s"]:.1f} | '
          f'{_fmt(r["xla_mem_gib_per_device"], ".2f")} | '
          f'{_fmt(r["peak_bytes_in_use_gib"], ".2f")} |')
  if rows:
    print(f'\n{rows[0]["devices"]}, global batch {rows[0]["batch"]}; MFU against '
          f'{rows[0]["peak_tflops_per_device"]} TFLOP/s per device for the first row '
          '(bf16 dense, or the f32 path of PEAKS).')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  app.run(main)
