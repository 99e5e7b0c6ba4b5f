r"""Editing measured on the class-conditional digits model (issue 20).

    python experiments/editing_digits.py --workdir=/tmp/runs/digits_cond

trains, when the workdir holds no checkpoint yet, ``configs/digits.py`` with
``data.use_labels=True, model.num_classes=10`` (the README's class-conditional job, minutes on a
CPU; 10% of the labels dropped for guidance), then measures with ``diffusion_jax.editing``:

1. Inversion + regeneration: ``--num_images`` real digits (every class in turn) inverted to t_max
   and sampled back with the same method and steps; PSNR (dB, range 2) at 10 / 50 / 200 steps for
   DDIM and DPM-Solver++(2M) inversion with the true label (w = 1), and DDIM vs EDICT with
   guidance w = 3.
2. Inpainting the right half: the left half (columns 0-3) kept, the right half generated with the
   null label (the unconditional model: nothing tells it the class but the left half); the share
   of completions the classifier assigns the original's class, for replacement alone and with
   RePaint's resampling. References: the classifier on the real digits themselves, and on the
   left half completed by a random other digit's right half.
3. img2img from real 3s with label 8 (guidance w = 1 and 3), strength 0.3 / 0.6 / 0.9, DDIM on a
   50-step grid: the share classified 8 and the RMS distance to the input (per pixel, range 2).

The classifier is ``experiments/digits_quality.py``'s MLP, fitted on 75% of scikit-learn's digits
(its held-out accuracy is printed). The real digits edited are the first ``num_images / 10`` of
each class (the model was trained on all 1797, so they are training images). Prints Markdown
tables and writes ``workdir/editing_digits.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Its classifier; importing it defines its flags (--workdir among them, used here too).
import digits_quality  # pylint: disable=wrong-import-position

flags.FLAGS.set_default('workdir', '/tmp/runs/digits_cond')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 100, 'Real digits per measurement.')
_STEPS = flags.DEFINE_list('steps', ['10', '50', '200'], 'Inversion step counts.')
_PARTS = flags.DEFINE_list('parts', ['inversion', 'inpainting', 'img2img'], 'What to measure.')


def _config():
  from diffusion_jax import configs  # pylint: disable=import-outside-toplevel
  config = configs.load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))), 'configs', 'digits.py')).get_config()
  config.data.use_labels = True
  config.model.num_classes = 10
  return config


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  from sklearn.model_selection import train_test_split  # pylint: disable=import-outside-toplevel

  from diffusion_jax import (  # pylint: disable=import-outside-toplevel
      cpu_runtime, editing, input_pipeline, preconditioning, training)
  from diffusion_jax.training import builders  # pylint: disable=import-outside-toplevel

  cpu_runtime.configure()
  config = _config()
  workdir = flags.FLAGS.workdir
  result = {'workdir': workdir, 'cpu_cores': os.cpu_count(), 'load_before': os.getloadavg(),
            'devices': str(jax.devices())}
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    t0 = time.time()
    training.train_and_evaluate(config, workdir)
    result['train_wall_s'] = time.time() - t0
  s, params, step = builders.restore_ema_params(config, workdir)
  s.checkpointer.close()
  result['checkpoint_step'] = int(step)
  process = s.process
  model_fn = preconditioning.make_model_fn(s.network_fn, params, process,
                                           parameterization=config.model.parameterization,
                                           noise_input_kind=config.model.noise_input)
  null = {'label': jnp.full((1,), 10, jnp.int32)}

  # The classifier of digits_quality.py, on scikit-learn's 0..16 scale.
  x_sk, y_sk = load_digits(return_X_y=True)
  x_tr, x_te, y_tr, y_te = train_test_split(x_sk, y_sk, test_size=0.25, random_state=0,
                                            stratify=y_sk)
  clf = digits_quality._classifiers()['mlp'].fit(x_tr, y_tr)  # pylint: disable=protected-access
  result['classifier_held_out_accuracy'] = float(clf.score(x_te, y_te))

  def classify(images):
    x = digits_quality._to_sklearn_scale(np.asarray(images), 8)  # pylint: disable=protected-access
    return clf.predict(x)

  images, labels = input_pipeline.load_digits_images(8)
  images = images.reshape(-1, 8, 8, 1)
  n = _NUM_IMAGES.value
  # n real digits, every class in turn (the first ones of each class).
  pick = np.array([np.flatnonzero(labels == i % 10)[i // 10] for i in range(n)])
  x_real, y_real = jnp.asarray(images[pick]), np.asarray(labels[pick])
  key = jax.random.PRNGKey(0)

  # 1. Inversion + regeneration PSNR.
  inv_rows, inp_rows, i2i_rows = [], [], []
  parts = _PARTS.value
  for method, w, mix in (('ddim', 1.0, None), ('dpmpp_2m', 1.0, None), ('ddim', 3.0, None),
                         ('edict', 3.0, None), ('edict', 3.0, 0.93)):
    if 'inversion' not in parts:
      break
    row = {'method': method if mix is None else f'{method}, p = {mix}', 'guidance': w}
    for steps in map(int, _STEPS.value):
      kw = dict(method=method, num_steps=steps, cond={'label': jnp.asarray(y_real, jnp.int32)})
      if mix is not None:
        kw['mix'] = mix
      if w != 1.0:
        kw.update(null_cond=null, guidance_scale=w)
      t0 = time.time()
      back = jax.jit(lambda x, kw=kw: editing.regenerate(
          model_fn, process, editing.invert(model_fn, process, x, **kw), **kw))(x_real)
      back = np.asarray(back)
      row[f'psnr_{steps}'] = float(np.mean(editing.psnr(back, x_real)))
      row[f'wall_s_{steps}'] = time.time() - t0
      print(method, w, steps, row[f'psnr_{steps}'], flush=True)
    inv_rows.append(row)
  result['inversion'] = inv_rows

  # 2. Inpainting the right half with the null label.
  mask = np.zeros((1, 8, 8, 1), np.float32)
  mask[:, :, :4] = 1.0
  y_unc = {'cond': {'label': jnp.full((n,), 10, jnp.int32)}}
  if 'inpainting' in parts:
    inp_rows = [{'setting': 'real digits (reference)',
                 'share_same_class': float(np.mean(classify(x_real) == y_real))}]
    swapped = np.asarray(x_real).copy()
    swapped[:, :, 4:] = np.asarray(x_real)[np.roll(np.arange(n), 5)][:, :, 4:]
    inp_rows.append({'setting': "right half of another class's digit (reference)",
                     'share_same_class': float(np.mean(classify(swapped) == y_real))})
    for method, steps, resample in (('ddim', 50, 1), ('ddpm', 100, 1), ('ddpm', 100, 5),
                                    ('ddpm', 100, 10)):
      t0 = time.time()
      out = jax.jit(lambda x, k, method=method, steps=steps, resample=resample: editing.inpaint(
          model_fn, process, x, mask, method=method, num_steps=steps, key=k, resample=resample,
          **y_unc))(x_real, jax.random.fold_in(key, resample))
      out = np.asarray(out)
      assert np.array_equal(out[:, :, :4], np.asarray(x_real)[:, :, :4])
      inp_rows.append({'setting': f'{method} {steps} steps, resample {resample}',
                       'share_same_class': float(np.mean(classify(out) == y_real)),
                       'wall_s': time.time() - t0})
      print(inp_rows[-1], flush=True)
  result['inpainting'] = inp_rows

  # 3. img2img from real 3s with label 8.
  if 'img2img' in parts:
    threes = jnp.asarray(images[np.flatnonzero(labels == 3)[:n]])
    m = threes.shape[0]
    i2i_rows = [{'guidance': None, 'strength': 0.0,
                 'share_8': float(np.mean(classify(threes) == 8)), 'rms_to_input': 0.0,
                 'share_3': float(np.mean(classify(threes) == 3))}]
    for w in (1.0, 3.0):
      kw = dict(cond={'label': jnp.full((m,), 8, jnp.int32)})
      if w != 1.0:
        kw.update(null_cond=null, guidance_scale=w)
      for strength in (0.3, 0.6, 0.9):
        out = np.asarray(jax.jit(lambda x, k, strength=strength, kw=kw: editing.img2img(
            model_fn, process, x, strength=strength, method='ddim', num_steps=50, key=k,
            **kw))(threes, jax.random.fold_in(key, int(strength * 10))))
        pred = classify(out)
        i2i_rows.append({'guidance': w, 'strength': strength,
                         'share_8': float(np.mean(pred == 8)),
                         'share_3': float(np.mean(pred == 3)),
                         'rms_to_input': float(np.sqrt(np.mean((out - np.asarray(threes))**2)))})
        print(i2i_rows[-1], flush=True)
  result['img2img'] = i2i_rows
  result['load_after'] = os.getloadavg()
  suffix = '' if len(parts) == 3 else '_' + '_'.join(parts)
  with open(os.path.join(workdir, f'editing_digits{suffix}.json'), 'w') as f:
    json.dump(result, f, indent=1)

  steps = list(map(int, _STEPS.value))
  print(f'\ncheckpoint step {step}; {n} real digits; classifier held-out accuracy '
        f'{result["classifier_held_out_accuracy"]:.3f}; devices {jax.devices()}')
  if inv_rows:
    print('\nInversion + regeneration, mean PSNR (dB):\n')
    print('| inversion | guidance | ' + ' | '.join(f'{k} steps' for k in steps) + ' |')
    print('|---|---|' + '---|' * len(steps))
    for r in inv_rows:
      print(f'| {r["method"]} | {r["guidance"]:g} | '
            + ' | '.join(f'{r[f"psnr_{k}"]:.1f}' for k in steps) + ' |')
  if inp_rows:
    print('\nInpainting the right half (null label), share classified as the original:\n')
    print('| setting | same class |\n|---|---|')
    for r in inp_rows:
      print(f'| {r["setting"]} | {r["share_same_class"]:.2f} |')
  if i2i_rows:
    print(f'\nimg2img from {len(threes)} real 3s with label 8 (DDIM, 50-step grid):\n')
    print('| guidance | strength | classified 8 | classified 3 | RMS distance to input |')
    print('|---|---|---|---|---|')
    for r in i2i_rows:
      g = '-' if r['guidance'] is None else f'{r["guidance"]:g}'
      print(f'| {g} | {r["strength"]:.1f} | {r["share_8"]:.2f} | {r["share_3"]:.2f} | '
            f'{r["rms_to_input"]:.3f} |')


if __name__ == '__main__':
  app.run(main)
