r"""Training-step throughput and MFU on an accelerator: the GPU/TPU measurements of issue 6.

    python experiments/bench_accel.py                 # CIFAR-10 DDPM U-Net, batch 128, all devices
    python experiments/bench_accel.py --smoke         # tiny U-Net, batch 8: checks the script (CPU)
    python experiments/bench_accel.py --sd=sd15,sdxl  # Stable Diffusion text-to-image images/s
    python experiments/bench_accel.py --sd=tiny --smoke   # the SD part on a tiny pipeline (CPU)

``--sd``: the whole 20-step text-to-image program of ``pipelines.StableDiffusionPipeline`` (text
encoders, guided DDIM loop, VAE decode: one jitted program) on the full SD 1.5 (512 px) and SDXL
(1024 px) architectures with random weights, per dtype x attention implementation of the U-Net
(``--sd_variants``), batch ``--sd_batch`` with classifier-free guidance: images/s, compile
seconds and peak device memory. (The VAE keeps 'xla' attention: its one 512-wide head exceeds
cuDNN's 256.)

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
_SD = flags.DEFINE_list('sd', [], "Stable Diffusion architectures to time instead of training: "
                        "'sd15', 'sdxl', 'tiny' (a check of the script).")
_SD_VARIANTS = flags.DEFINE_list('sd_variants', ['bfloat16/xla', 'bfloat16/cudnn',
                                                 'float32/xla'], 'dtype/attention pairs.')
_SD_BATCH = flags.DEFINE_integer('sd_batch', 4, 'Images per text-to-image call.')
_SD_STEPS = flags.DEFINE_integer('sd_steps', 20, 'Sampler steps.')

# Full configurations (diffusers' config.json of runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-xl-base-1.0, architecture fields).
_SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                  block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                  down_block_types=['CrossAttnDownBlock2D'] * 3 + ['DownBlock2D'],
                  up_block_types=['UpBlock2D'] + ['CrossAttnUpBlock2D'] * 3)
_SDXL_UNET = dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
                  block_out_channels=[320, 640, 1280], layers_per_block=2,
                  transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                  down_block_types=['DownBlock2D'] + ['CrossAttnDownBlock2D'] * 2,
                  up_block_types=['CrossAttnUpBlock2D'] * 2 + ['UpBlock2D'],
                  addition_embed_type='text_time', addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816)
_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
            down_block_types=['DownEncoderBlock2D'] * 4, up_block_types=['UpDecoderBlock2D'] * 4)
_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, hidden_act='quick_gelu',
               projection_dim=768, eos_token_id=49407)
_BIGG = dict(_CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
             num_attention_heads=20, hidden_act='gelu', projection_dim=1280)
_TINY_UNET = dict(sample_size=8, cross_attention_dim=32, attention_head_dim=4,
                  block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
                  down_block_types=['CrossAttnDownBlock2D', 'DownBlock2D'],
                  up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D'])
_TINY_TEXT = dict(_CLIP_L, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, projection_dim=32)
_DDIM = dict(_class_name='DDIMScheduler', beta_start=0.00085, beta_end=0.012,
             beta_schedule='scaled_linear', clip_sample=False, set_alpha_to_one=False,
             steps_offset=1)


def _sd_pipeline(arch: str, dtype: str, attention: str):
  """A StableDiffusionPipeline of ``arch`` with random weights (initialized on the devices)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from diffusion_jax import sharding, tokenization  # pylint: disable=import-outside-toplevel
  from diffusion_jax.models import autoencoder_kl, clip, unet_2d_condition  # pylint: disable=import-outside-toplevel
  from diffusion_jax.pipelines import schedulers, stable_diffusion  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(os.path.dirname(_CONFIGS), 'tests'))
  import sd_fixtures  # pylint: disable=import-outside-toplevel
  dt = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}[dtype]
  unet_cfg = {'sd15': _SD15_UNET, 'sdxl': _SDXL_UNET, 'tiny': _TINY_UNET}[arch]
  texts = {'sd15': [_CLIP_L], 'sdxl': [_CLIP_L, _BIGG], 'tiny': [_TINY_TEXT]}[arch]
  vae_cfg = _VAE if arch != 'tiny' else dict(_VAE, block_out_channels=[32, 32],
                                              down_block_types=['DownEncoderBlock2D'] * 2,
                                              up_block_types=['UpDecoderBlock2D'] * 2,
                                              norm_num_groups=8)
  unet = unet_2d_condition.UNet2DConditionModel.from_config(unet_cfg, dtype=dt, attention=attention)
  vae = autoencoder_kl.AutoencoderKL.from_config(vae_cfg, dtype=dt)
  classes = (clip.CLIPTextModel, clip.CLIPTextModelWithProjection)  # SDXL's second: projected
  encoders = [cls.from_config(c, dtype=dt, param_dtype=dt) for cls, c in zip(classes, texts)]
  key, h = jax.random.key(0), unet_cfg['sample_size']
  ctx = sum(c['hidden_size'] for c in texts) if arch == 'sdxl' else texts[0]['hidden_size']
  added = ({'text_embeds': jnp.zeros((1, 1280), dt), 'time_ids': jnp.zeros((1, 6), dt)}
           if arch == 'sdxl' else None)
  cast = lambda tree: jax.tree.map(lambda x: x.astype(dt), tree)  # noqa: E731
  params = {'unet': cast(jax.jit(lambda k: unet.init(k, jnp.zeros((1, h, h, 4), dt),
                                                        jnp.ones((1,)), jnp.zeros((1, 77, ctx), dt),
                                                        added_cond_kwargs=added))(key)['params']),
            'vae': cast(jax.jit(lambda k: vae.init(k, jnp.zeros((1, h, h, 4), dt),
                                                   method=vae.decode))(key)['params'])}
  for name, enc in zip(('text_encoder', 'text_encoder_2'), encoders):
    params[name] = cast(jax.jit(enc.init)(key, jnp.ones((1, 77), jnp.int32))['params'])
  tok_dir = os.path.join(tempfile.mkdtemp(), 'tokenizer')
  sd_fixtures.write_clip_tokenizer(__import__('pathlib').Path(tok_dir))
  tok = tokenization.CLIPTokenizer.from_directory(tok_dir)
  mesh = sharding.make_mesh()
  return stable_diffusion.StableDiffusionPipeline(
      kind='sdxl' if arch == 'sdxl' else 'sd', unet=unet, vae=vae, text_encoders=tuple(encoders),
      tokenizers=(tok,) * len(encoders), scheduler=schedulers.from_config(_DDIM),
      params=sharding.put_params(params, mesh), mesh=mesh)


def run_sd(arch: str, dtype: str, attention: str) -> dict:
  """Images/s of the whole text-to-image program of ``arch`` (module docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  pipe = _sd_pipeline(arch, dtype, attention)
  batch, steps = (2, 2) if _SMOKE.value else (_SD_BATCH.value, _SD_STEPS.value)
  prompts = ['a photo of an astronaut riding a horse on the moon'] * batch
  run = lambda: pipe.text_to_image(prompts, negative_prompt='blurry',  # noqa: E731
                                   num_steps=steps).block_until_ready()
  t = time.perf_counter()
  run()
  first = time.perf_counter() - t
  times = []
  for _ in range(1 if _SMOKE.value else 3):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
  sec = statistics.median(times)
  stats = jax.devices()[0].memory_stats() or {}
  return {'arch': arch, 'dtype': dtype, 'attention': attention, 'batch': batch, 'steps': steps,
          'size': pipe.default_size, 'img_s': batch / sec, 's_per_call': sec,
          'compile_s': first - sec,
          'peak_gib': stats.get('peak_bytes_in_use', 0) / 2**30 or None,
          'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}'}


def main_sd() -> None:
  import jax  # pylint: disable=import-outside-toplevel
  rows = []
  for arch in _SD.value:
    for variant in _SD_VARIANTS.value:
      dtype, attention = variant.split('/')
      if attention == 'cudnn' and jax.default_backend() != 'gpu':
        print(f'  {arch} {variant}: skipped (cuDNN attention runs on NVIDIA GPUs only)', flush=True)
        continue
      try:
        row = run_sd(arch, dtype, attention)
      except Exception as e:  # pylint: disable=broad-except
        print(f'  {arch} {variant}: FAILED {type(e).__name__}: {str(e)[:300]}', flush=True)
        continue
      rows.append(row)
      print(f'  {arch} {variant}: {json.dumps(row)}', flush=True)
  print('\n| arch | size | dtype | U-Net attention | batch | steps | img/s | s/call | compile s | '
        'peak GiB |\n|' + '---|' * 10)
  for r in rows:
    print(f'| {r["arch"]} | {r["size"]} | {r["dtype"]} | {r["attention"]} | {r["batch"]} | '
          f'{r["steps"]} | {r["img_s"]:.2f} | {r["s_per_call"]:.3f} | {r["compile_s"]:.1f} | '
          f'{_fmt(r["peak_gib"], ".2f")} |')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(rows, f, indent=1)

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
  if _SD.value:
    main_sd()
    return
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
