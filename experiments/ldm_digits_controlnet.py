r"""Does a ControlNet trained on the embedded digits job make its samples follow an edge map?

    python experiments/ldm_digits_controlnet.py --workdir=runs/ldm_digits \
        [--config=configs/ldm_digits_controlnet.py]

1. Restores the trained text-to-image job of ``configs/ldm_digits.py`` in ``--workdir`` (its EMA
   U-Net and text encoder, both frozen from here on; the autoencoder for encoding and decoding).
2. Trains a ControlNet (Zhang et al. 2023) made by ``ControlNetModel.from_unet`` from that U-Net
   (one-channel control images, ``controlnet.conditioning_embedding_out_channels``), on the
   training images' edge maps (``edge_map``: the ink's one-pixel boundary) with their captions,
   with ``pipelines.controlnet.denoising_objective`` (the U-Net frozen; ``text_dropout`` of the
   prompts replaced by the empty one, the control kept). Writes it as a diffusers ControlNet
   directory ``controlnet/`` (``weights.controlnet.save_controlnet``) into ``--output_dir``
   (default: the workdir).
3. Samples, with the job's sampler and guidance, one image per held-out writer's image
   (``num_eval_singles`` single digits, ``num_eval_pairs`` pairs), prompted with its caption and
   controlled by its edge map; and the same prompts and noise at conditioning scale 0 (the
   U-Net alone). Reports, for both: the IoU of the sample's edge map with the control (exact
   pixels, and after a 3x3 dilation of both, which forgives one-pixel shifts), and the share of
   samples whose digits ``digit_classifier`` reads as prompted (both, in place, for pairs).

Also writes ``controlnet_quality.json`` and ``controlnet_quality.png`` (tiles of control, sample
with the ControlNet, sample without) there, and prints a Markdown table.

Measured 2026-11-29 on a shared 2-core CPU, ``--steps=1200 --num_eval=100`` on the job trained
by ``configs/ldm_digits.py`` (4000 steps): training 305 s; held-out writers, 100 singles + 100
pairs of seen classes, dpmpp_2m 25 steps, guidance 3:

| samples | edge IoU | edge IoU (1 px tolerance) | digit correct (singles) | both correct (pairs) |
|---|---|---|---|---|
| with the ControlNet | 0.442 | 0.763 | 95.0% | 98.0% |
| U-Net alone (scale 0, same noise) | 0.212 | 0.526 | 82.0% | 91.0% |
| the real images | 1.000 | 1.000 | 99.0% | 98.0% |

(600 steps on the job's step-2000 checkpoint: 0.240 / 0.548 / 44% / 45% against 0.103 / 0.317 /
13% / 2% for that U-Net alone.)
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKDIR = flags.DEFINE_string('workdir', 'runs/ldm_digits', "The digits job's work directory.")
_CONFIG = flags.DEFINE_string('config', 'configs/ldm_digits_controlnet.py', 'Config file.')
_OUTPUT = flags.DEFINE_string('output_dir', None, 'Where to write the ControlNet and the report '
                              '(default: --workdir).')
_STEPS = flags.DEFINE_integer('steps', None, 'Override controlnet.num_train_steps.')
_EVAL = flags.DEFINE_integer('num_eval', None, 'Override num_eval_singles and num_eval_pairs.')


def edge_map(images):
  """``[N, H, W, 1]`` images in [-1, 1] -> ``[N, H, W, 1]`` float32 {0, 1}: ink pixels (> 0) with
  a non-ink 4-neighbour (or on the border), the ink's one-pixel boundary."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  ink = images[..., 0] > 0.0
  padded = np.pad(ink, ((0, 0), (1, 1), (1, 1)), constant_values=False)
  interior = (padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2]
              & padded[:, 1:-1, 2:])
  return (ink & ~interior).astype(np.float32)[..., None]


def _dilate(mask):
  import numpy as np  # pylint: disable=import-outside-toplevel
  m = mask[..., 0] > 0.5
  p = np.pad(m, ((0, 0), (1, 1), (1, 1)))
  out = np.zeros_like(m)
  for dy in range(3):
    for dx in range(3):
      out |= p[:, dy:dy + m.shape[1], dx:dx + m.shape[2]]
  return out[..., None].astype(np.float32)


def iou(a, b):
  """Per-image IoU of two {0, 1} masks ``[N, H, W, 1]`` (1 when both are empty)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  a, b = a > 0.5, b > 0.5
  inter = np.sum(a & b, axis=(1, 2, 3))
  union = np.sum(a | b, axis=(1, 2, 3))
  return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from diffusion_jax import configs, cpu_runtime, input_pipeline, preconditioning, sampling, writers  # pylint: disable=import-outside-toplevel
  from diffusion_jax.models import controlnet as controlnet_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax.pipelines import controlnet as cn_pipeline  # pylint: disable=import-outside-toplevel
  from diffusion_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax.training import step as step_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax.training.state import TrainState  # pylint: disable=import-outside-toplevel
  from diffusion_jax.weights import controlnet as cn_weights  # pylint: disable=import-outside-toplevel
  from experiments import digit_classifier, ldm_digits_job  # pylint: disable=import-outside-toplevel

  cpu_runtime.configure()
  module = configs.load(_CONFIG.value)
  config, c = module.get_config(), module.get_controlnet_config()
  if _STEPS.value is not None:
    c.num_train_steps = _STEPS.value
  if _EVAL.value is not None:
    c.num_eval_singles = c.num_eval_pairs = _EVAL.value
  workdir = _WORKDIR.value
  out = _OUTPUT.value or workdir
  os.makedirs(out, exist_ok=True)
  result = {'config': _CONFIG.value, 'controlnet': c.to_dict(), 'cpu_cores': os.cpu_count(),
            'load_average_before': os.getloadavg()}

  # 1. The trained job, frozen.
  s, params, ldm_step = ldm_digits_job.restore(config, workdir)
  lm, unet, job = s.latent, s.module, s.config
  result['ldm_step'] = ldm_step
  text_params = params['text_encoder']
  encode_text = jax.jit(lambda p, ids: lm.text.apply({'params': p}, ids)['last_hidden_state'])
  def contexts(captions):
    return np.concatenate([np.asarray(encode_text(text_params, lm.tokenize(captions[i:i + 500])))
                           for i in range(0, len(captions), 500)])

  # 2. Training data: posterior-mean latents as the job scales them, edge maps, text states.
  train = input_pipeline.digits_text_examples('train')
  data = {'x': ldm_digits_job.latent_encoder(lm)(train.images),
          'control': edge_map(train.images), 'context': contexts(train.captions)}
  null_context = contexts([''])  # [1, L, D]

  module, cn_params = controlnet_lib.ControlNetModel.from_unet(
      unet, params['unet'], key=jax.random.key(config.seed + 7), conditioning_channels=1,
      conditioning_embedding_out_channels=tuple(c.conditioning_embedding_out_channels))
  loss_fn = cn_pipeline.denoising_objective(
      unet=unet, controlnet=module, process=s.process, cond_fn=lambda f, b: {'context': b['context']},
      parameterization=job.model.parameterization, noise_input=job.model.noise_input,
      null_cond={'context': null_context}, cond_dropout=c.text_dropout,
      weighting=job.training.weighting, time_sampling=job.training.time_sampling)
  schedule = optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  state = TrainState.create(params=cn_params, tx=tx)
  frozen = {'unet': jax.tree.map(jnp.asarray, params['unet'])}
  step_fn = jax.jit(lambda st, b, k, f: step_lib.train_step(st, b, k, f, loss_fn=loss_fn,
                                                            ema_decay=c.ema_decay),
                    donate_argnums=(0,))
  rng = np.random.default_rng(config.seed)
  key = jax.random.key(config.seed + 8)
  n = len(data['x'])
  t0 = time.time()
  log = []
  for i in range(c.num_train_steps):
    idx = rng.choice(n, c.batch_size, replace=False)
    state, metrics = step_fn(state, {k: v[idx] for k, v in data.items()}, key, frozen)
    if (i + 1) % c.log_every == 0 or i == 0:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      log.append({'step': i + 1, 'loss': m['loss'], 'grad_norm': m['grad_norm'],
                  'wall_s': time.time() - t0})
      print(f'step {i + 1}: loss {m["loss"]:.4f}, grad norm {m["grad_norm"]:.3f}', flush=True)
  result['train_wall_s'] = time.time() - t0
  result['train_log'] = log
  cn_final = jax.device_get(state.ema_params)
  out_dir = cn_weights.save_controlnet(os.path.join(out, 'controlnet'), module, cn_final)
  result['controlnet_dir'] = str(out_dir)

  # 3. Held-out writers: sample with the ControlNet and without it (scale 0), same noise.
  singles = input_pipeline.digits_text_examples('test_singles')
  pairs = input_pipeline.digits_text_examples('test_seen_pairs')
  ns, npairs = c.num_eval_singles, c.num_eval_pairs
  images = np.concatenate([singles.images[:ns], pairs.images[:npairs]])
  captions = list(singles.captions[:ns]) + list(pairs.captions[:npairs])
  digits = np.concatenate([singles.digits[:ns], pairs.digits[:npairs]])
  is_single = np.arange(len(images)) < ns
  control = edge_map(images)
  smp = job.sampling
  options = config_lib.sampler_options(job)
  prediction = preconditioning.prediction_type(job.model.parameterization)

  def network_fn(p, x, c_noise, cond, *, train=False, rngs=None):
    del train, rngs
    return cn_pipeline.controlnet_model_fn(unet, p['unet'], (module,), (p['cn'],),
                                           scales=(p['scale'],))(x, c_noise, cond)

  @jax.jit
  def run(p, context, control, key):
    b = context.shape[0]
    cond = {'context': context, 'control': (control,)}
    null = {'context': jnp.broadcast_to(null_context, context.shape), 'control': (control,)}
    model_fn = preconditioning.make_model_fn(
        network_fn, p, s.process, parameterization=job.model.parameterization,
        noise_input_kind=job.model.noise_input)
    k_noise, k_sampler = jax.random.split(key)
    x_T = s.process.prior_sample(k_noise, (b,) + lm.latent_shape)
    z = sampling.sample(model_fn, s.process, method=smp.method, num_steps=smp.num_steps,
                        key=k_sampler, x_T=x_T, prediction=prediction, cond=cond, null_cond=null,
                        guidance_scale=smp.guidance_scale, **options)
    return lm.vae.apply({'params': lm.vae_params}, z / lm.scale + lm.shift,
                        method=lm.vae.decode)

  context = contexts(captions)
  samples = {}
  t0 = time.time()
  for name, scale in (('controlnet', c.conditioning_scale), ('unet_alone', 0.0)):
    p = {'unet': params['unet'], 'cn': cn_final, 'scale': jnp.float32(scale)}
    chunks = []
    for i in range(0, len(images), 100):
      chunks.append(np.asarray(run(p, context[i:i + 100], control[i:i + 100],
                                   jax.random.fold_in(jax.random.key(1234), i))))
    samples[name] = np.concatenate(chunks)
  result['sample_wall_s'] = time.time() - t0

  rows = []
  for name, imgs in list(samples.items()) + [('real_images', images)]:
    edges = edge_map(imgs)
    uint8 = writers.to_uint8(imgs)
    single_labels, _ = digit_classifier.classify_single(uint8[is_single])
    left, right = digit_classifier.classify_pair(uint8[~is_single])
    correct = np.concatenate([single_labels == digits[is_single, 0],
                              (left == digits[~is_single, 0]) & (right == digits[~is_single, 1])])
    rows.append({'samples': name, 'n': len(imgs),
                 'edge_iou': float(np.mean(iou(edges, control))),
                 'edge_iou_dilated': float(np.mean(iou(_dilate(edges), _dilate(control)))),
                 'digits_correct_single': float(np.mean(correct[is_single])),
                 'digits_correct_pairs': float(np.mean(correct[~is_single]))})
  result['rows'] = rows
  show = []
  for i in list(range(min(10, ns))) + list(range(ns, min(ns + 10, len(images)))):
    # One tile per example: control | with the ControlNet | without, side by side.
    show.append(np.concatenate([control[i] * 2 - 1, samples['controlnet'][i],
                                samples['unet_alone'][i]], axis=1))
  png = os.path.join(out, 'controlnet_quality.png')
  writers.save_image_grid(png, np.stack(show), upscale=2)
  result['grid'] = png

  print(f'\nControlNet: {c.num_train_steps} steps in {result["train_wall_s"]:.0f} s on the frozen '
        f'job (step {ldm_step}); {smp.method}, {smp.num_steps} steps, guidance '
        f'{smp.guidance_scale}; held-out writers, {ns} singles + {npairs} pairs')
  print('| samples | edge IoU | edge IoU (1 px tolerance) | digit correct (singles) | '
        'both digits correct (pairs) |')
  print('|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["samples"]} | {r["edge_iou"]:.3f} | {r["edge_iou_dilated"]:.3f} | '
          f'{100 * r["digits_correct_single"]:.1f}% | {100 * r["digits_correct_pairs"]:.1f}% |')
  with open(os.path.join(out, 'controlnet_quality.json'), 'w') as f:
    json.dump(result, f, indent=2)
  print(f'wrote {png}, {out_dir} and {os.path.join(out, "controlnet_quality.json")}')


if __name__ == '__main__':
  app.run(main)
