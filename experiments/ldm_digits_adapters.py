r"""LoRA and textual inversion trained on the embedded digits job, and measured.

    python experiments/ldm_digits_adapters.py --workdir=runs/ldm_digits \
        --config=configs/ldm_digits_lora.py                 # or ldm_digits_textual_inversion.py

Both start from the trained text-to-image job of ``configs/ldm_digits.py`` in ``--workdir`` (its
EMA U-Net and jointly trained text encoder, frozen here; the autoencoder encodes the training
images once, as posterior means, and decodes the samples). The adapter's settings are the config
file's ``get_adapter_config()``.

``adapter='lora'`` (Hu et al. 2021, ``diffusion_jax.adapters.lora``): a LoRA of rank ``rank`` on
the U-Net kernels named by ``targets`` is trained, the U-Net frozen (merged inside the jitted loss),
on the training writers' single digits mirrored left to right with their unchanged captions. It is
written as a diffusers / PEFT file (``WORKDIR/lora/pytorch_lora_weights.safetensors``; its size
against the U-Net's float32 weights is reported), read back with ``adapters.lora.read_lora``, and
``num_samples_per_digit`` samples of each prompt ``the digit zero`` .. ``the digit nine`` are drawn
with it and, with the same noise, without it. Reported: the share of samples drawn mirrored (an RBF
SVM trained on the training writers' digits, original against mirrored, on the classifier's 8x8
view; its accuracy on the held-out writers' real digits is printed as the ceiling) and the share
that ``digit_classifier`` reads as the prompted digit once mirrored back (without the LoRA: as
drawn).

``adapter='textual_inversion'`` (Gal et al. 2022, ``diffusion_jax.adapters.textual_inversion``):
for each class of ``digits``, one new token ``token`` is added to the job's word vocabulary and its
embedding row, started from ``initializer_token``'s, is the only trained value, on the first
``num_images`` single digits of that class drawn by the held-out writers (never in the job's
training data), captioned ``the digit <new>``. Written as diffusers' ``learned_embeds.safetensors``
(``WORKDIR/textual_inversion_<class>/``), read back with ``read_embeddings``, and ``num_samples``
samples of ``the digit <new>`` are drawn. Reported: the share ``digit_classifier`` reads as the
class, against the same prompt and noise with the start row (``initializer_token``'s embedding),
and the share of the training images themselves it reads as the class.

Each run writes ``<adapter>_quality.json`` and a PNG grid into ``--output_dir`` (default: the
workdir) and prints a Markdown table. The sampler and guidance are the job's (``sampling.*``).
Measured figures: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKDIR = flags.DEFINE_string('workdir', 'runs/ldm_digits', "The digits job's work directory.")
_CONFIG = flags.DEFINE_string('config', 'configs/ldm_digits_lora.py', 'Config file: '
                              'configs/ldm_digits_lora.py or ldm_digits_textual_inversion.py.')
_OUTPUT = flags.DEFINE_string('output_dir', None, 'Where to write the adapter files and the '
                              'report (default: --workdir).')
_STEPS = flags.DEFINE_integer('steps', None, "Override the adapter's num_train_steps.")
_SAMPLES = flags.DEFINE_integer('num_samples', None, 'Override num_samples_per_digit (LoRA) or '
                                'num_samples (textual inversion).')
_DIGITS = flags.DEFINE_list('digits', None, "Override the textual inversion's classes.")


def mirror_classifier():
  """``(predict, held_out)``: ``predict(images [N, 32, 32, 1]) -> bool [N]`` (drawn mirrored).

  An RBF SVM (``digit_classifier``'s gamma and C) on the 8x8 view of the training writers' single
  digits, each as drawn (label 0) and mirrored left to right (label 1). ``held_out`` is its
  accuracy on the held-out writers' real digits, both ways, per class and overall.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from sklearn import svm  # pylint: disable=import-outside-toplevel

  from diffusion_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  from experiments import digit_classifier as dc  # pylint: disable=import-outside-toplevel

  def features(images):
    return dc.to_8x8(images).reshape(len(images), -1)

  train = input_pipeline.digits_text_examples('train')
  singles = train.images[train.digits[:, 1] < 0]
  x = np.concatenate([features(singles), features(singles[:, :, ::-1])])
  y = np.r_[np.zeros(len(singles)), np.ones(len(singles))]
  clf = svm.SVC(gamma=dc._GAMMA, C=dc._C).fit(x, y)  # pylint: disable=protected-access

  def predict(images):
    return clf.predict(features(images)) > 0.5

  test = input_pipeline.digits_text_examples('test_singles')
  labels = test.digits[:, 0]
  as_drawn = ~predict(test.images)
  mirrored = predict(test.images[:, :, ::-1])
  held_out = {'overall': float(np.mean(np.r_[as_drawn, mirrored]))}
  held_out.update({str(k): float(np.mean(np.r_[as_drawn[labels == k], mirrored[labels == k]]))
                   for k in range(10)})
  return predict, held_out


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from diffusion_jax import configs, cpu_runtime, input_pipeline, objectives, preconditioning, sampling, writers  # pylint: disable=import-outside-toplevel
  from diffusion_jax.adapters import lora as lora_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax.adapters import textual_inversion as ti  # pylint: disable=import-outside-toplevel
  from diffusion_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax.training import latent, step as step_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax.training.state import TrainState  # pylint: disable=import-outside-toplevel
  from experiments import digit_classifier, ldm_digits_job  # pylint: disable=import-outside-toplevel

  cpu_runtime.configure()
  module = configs.load(_CONFIG.value)
  config, c = module.get_config(), module.get_adapter_config()
  if c.adapter not in ('lora', 'textual_inversion'):
    raise ValueError(f"adapter must be 'lora' or 'textual_inversion', got {c.adapter!r}.")
  if _STEPS.value is not None:
    c.num_train_steps = _STEPS.value
  if _SAMPLES.value is not None:
    c['num_samples_per_digit' if c.adapter == 'lora' else 'num_samples'] = _SAMPLES.value
  if _DIGITS.value is not None:
    c.digits = tuple(int(d) for d in _DIGITS.value)
  workdir = _WORKDIR.value
  out = _OUTPUT.value or workdir
  os.makedirs(out, exist_ok=True)
  result = {'config': _CONFIG.value, 'adapter': c.to_dict(), 'cpu_cores': os.cpu_count(),
            'load_average_before': os.getloadavg()}

  # The trained job, frozen.
  s, params, ldm_step = ldm_digits_job.restore(config, workdir)
  lm, unet, job = s.latent, s.module, s.config
  result['ldm_step'] = ldm_step
  latents_of = ldm_digits_job.latent_encoder(lm)
  decode = jax.jit(lambda z: lm.vae.apply({'params': lm.vae_params}, z / lm.scale + lm.shift,
                                          method=lm.vae.decode))

  prediction = preconditioning.prediction_type(job.model.parameterization)
  options = config_lib.sampler_options(job)
  smp = job.sampling

  def denoising_loss(network_fn, null_ids, dropout):
    return objectives.denoising(
        network_fn=network_fn, process=s.process, parameterization=job.model.parameterization,
        noise_input=job.model.noise_input, weighting=job.training.weighting,
        min_snr_gamma=job.training.min_snr_gamma, time_sampling=job.training.time_sampling,
        logit_normal_mean=job.training.logit_normal_mean,
        logit_normal_std=job.training.logit_normal_std,
        cond_fn=lambda f, b: {'input_ids': b['input_ids']},
        null_cond={'input_ids': jnp.asarray(null_ids)}, cond_dropout=dropout)

  def train(loss_fn, trainable, frozen, data):
    """Adam on ``trainable`` (EMA ``c.ema_decay``); returns the EMA (or last) values and a log."""
    schedule = optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    state = TrainState.create(params=trainable, tx=tx)
    step_fn = jax.jit(lambda st, b, k, f: step_lib.train_step(
        st, b, k, f, loss_fn=loss_fn, ema_decay=c.ema_decay), donate_argnums=(0,))
    rng = np.random.default_rng(config.seed)
    key = jax.random.key(config.seed + 9)
    n = len(data['x'])
    t0, log = time.time(), []
    for i in range(c.num_train_steps):
      idx = rng.choice(n, c.batch_size, replace=n < c.batch_size)
      state, metrics = step_fn(state, {k: v[idx] for k, v in data.items()},
                               jax.random.fold_in(key, i), frozen)
      if (i + 1) % c.log_every == 0 or i == 0:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        log.append({'step': i + 1, 'loss': m['loss'], 'wall_s': time.time() - t0})
        print(f'step {i + 1}: loss {m["loss"]:.4f}', flush=True)
    final = state.ema_params if c.ema_decay > 0 else state.params
    return jax.device_get(final), {'train_wall_s': time.time() - t0, 'train_log': log}

  def sample(network_fn, p, ids, null_ids, key):
    """Images [N, 32, 32, 1] in [-1, 1] of ``ids`` [N, L] (the job's sampler and guidance)."""
    @jax.jit
    def run(p, ids, key):
      model_fn = preconditioning.make_model_fn(
          network_fn, p, s.process, parameterization=job.model.parameterization,
          noise_input_kind=job.model.noise_input)
      k_noise, k_sampler = jax.random.split(key)
      x_T = s.process.prior_sample(k_noise, (ids.shape[0],) + lm.latent_shape)
      z = sampling.sample(model_fn, s.process, method=smp.method, num_steps=smp.num_steps,
                          key=k_sampler, x_T=x_T, prediction=prediction,
                          cond={'input_ids': ids},
                          null_cond={'input_ids': jnp.broadcast_to(null_ids, ids.shape)},
                          guidance_scale=smp.guidance_scale, **options)
      return decode(z)
    return np.concatenate([np.asarray(run(p, ids[i:i + 100], jax.random.fold_in(key, i)))
                           for i in range(0, len(ids), 100)])

  empty = lm.tokenize([''])
  words = input_pipeline.DIGIT_WORDS
  rows, show = [], []
  if c.adapter == 'lora':
    train_set = input_pipeline.digits_text_examples('train')
    single = train_set.digits[:, 1] < 0
    images = train_set.images[single][:, :, ::-1]  # mirrored left to right
    data = {'x': latents_of(images),
            'input_ids': lm.tokenize([train_set.captions[i] for i in np.flatnonzero(single)])}
    base_unet = params['unet']
    lora = lora_lib.init_lora(base_unet, rank=c.rank, alpha=c.alpha, targets=tuple(c.targets),
                              key=jax.random.key(config.seed + 10))
    base_loss = denoising_loss(s.network_fn, empty, c.text_dropout)

    def loss_fn(lora, frozen, batch, key):
      merged = {'unet': lora_lib.merge(frozen['unet'], lora),
                'text_encoder': frozen['text_encoder']}
      return base_loss(merged, frozen, batch, key)

    trained, log = train(loss_fn, lora, {'unet': base_unet,
                                         'text_encoder': params['text_encoder']}, data)
    result.update(log)
    path = lora_lib.save_lora(os.path.join(out, 'lora'), {'unet': trained}, unet_module=unet)
    unet_bytes = 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base_unet))
    shapes = {'unet': jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base_unet)}
    loaded = lora_lib.read_lora(path, shapes, unet_module=unet)
    result.update(lora_file=str(path), lora_file_bytes=os.path.getsize(path),
                  unet_float32_bytes=unet_bytes,
                  lora_parameters=lora_lib.num_parameters(trained),
                  unet_parameters=unet_bytes // 4)
    n = c.num_samples_per_digit
    labels = np.repeat(np.arange(10), n)
    ids = lm.tokenize([f'the digit {words[k]}' for k in labels])
    key = jax.random.key(4321)
    with_lora = {'unet': lora_lib.merge(base_unet, loaded['unet']),
                 'text_encoder': params['text_encoder']}
    samples = {'with the LoRA': sample(s.network_fn, with_lora, ids, empty, key),
               'without (the job alone, same noise)': sample(s.network_fn, params, ids, empty, key)}
    is_mirrored, held_out = mirror_classifier()
    result['mirror_classifier_held_out'] = held_out
    for name, imgs in samples.items():
      mirrored = is_mirrored(imgs)
      drawn = imgs[:, :, ::-1] if name.startswith('with the') else imgs
      read, _ = digit_classifier.classify_single(writers.to_uint8(drawn))
      rows.append({'samples': name, 'n': len(imgs), 'mirrored': float(np.mean(mirrored)),
                   'prompted_digit': float(np.mean(read == labels)),
                   'both': float(np.mean(mirrored & (read == labels))),
                   'mirrored_per_digit': [float(np.mean(mirrored[labels == k])) for k in range(10)],
                   'digit_per_digit': [float(np.mean((read == labels)[labels == k]))
                                       for k in range(10)]})
    for i in np.flatnonzero(np.arange(len(labels)) % n < 2):  # two tiles per prompt
      show.append(np.concatenate([samples[name][i] for name in samples], axis=1))  # with | without
    header = (f'LoRA r={c.rank} on {", ".join(c.targets)}: {c.num_train_steps} steps in '
              f'{result["train_wall_s"]:.0f} s; file {result["lora_file_bytes"] / 1e3:.1f} kB = '
              f'{100 * result["lora_file_bytes"] / unet_bytes:.2f}% of the U-Net\'s '
              f'{unet_bytes / 1e6:.2f} MB float32 weights; mirror classifier on held-out real '
              f'digits {100 * held_out["overall"]:.1f}%')
    table = ['| samples | n | drawn mirrored | prompted digit (mirrored back for the LoRA) | '
             'both |', '|---|---|---|---|---|']
    table += [f'| {r["samples"]} | {r["n"]} | {100 * r["mirrored"]:.1f}% | '
              f'{100 * r["prompted_digit"]:.1f}% | {100 * r["both"]:.1f}% |' for r in rows]
  else:
    tok = lm.tokenizer
    test = input_pipeline.digits_text_examples('test_singles')
    init_id = tok.convert_tokens_to_ids(c.initializer_token)
    if init_id is None:
      raise ValueError(f'initializer_token {c.initializer_token!r} is not in the vocabulary.')
    if tok.convert_tokens_to_ids(c.token) is None:
      tok.add_tokens([c.token])
    prompt = f'the digit {c.token}'
    text = lm.text.clone(vocab_size=tok.vocab_size)
    network_fn = latent.ldm_network(unet, text)
    if tok.vocab_size != ti.table(params['text_encoder']).shape[0] + 1:
      raise ValueError(f'expected one new token after the job\'s {lm.text.vocab_size} words.')
    base_loss = denoising_loss(network_fn, empty, c.text_dropout)

    def loss_fn(rows_, frozen, batch, key):
      merged = {'unet': frozen['unet'],
                'text_encoder': ti.with_rows(frozen['text_encoder'], rows_)}
      return base_loss(merged, frozen, batch, key)

    for digit in c.digits:
      pick = np.flatnonzero(test.digits[:, 0] == digit)[:c.num_images]
      data = {'x': latents_of(test.images[pick]),
              'input_ids': lm.tokenize([prompt] * len(pick))}
      rows0 = ti.initial_rows(params['text_encoder'], [init_id])
      frozen = {'unet': params['unet'], 'text_encoder': params['text_encoder']}
      learned, log = train(loss_fn, jnp.array(rows0), frozen, data)  # a copy: the step donates
      path = ti.save_embeddings(os.path.join(out, f'textual_inversion_{digit}'), c.token, learned)
      _, vectors = ti.read_embeddings(path)
      key = jax.random.key(4321 + digit)
      ids = lm.tokenize([prompt] * c.num_samples)
      row = {'digit': digit, 'n': c.num_samples, 'file': str(path), **log}
      read, _ = digit_classifier.classify_single(writers.to_uint8(test.images[pick]))
      row['training_images_correct'] = float(np.mean(read == digit))  # the classifier's ceiling
      for name, vec in (('learned', vectors['']), ('start', rows0)):
        p = {'unet': params['unet'], 'text_encoder': ti.with_rows(params['text_encoder'],
                                                                  jnp.asarray(vec))}
        imgs = sample(network_fn, p, ids, empty, key)
        read, _ = digit_classifier.classify_single(writers.to_uint8(imgs))
        row[f'{name}_correct'] = float(np.mean(read == digit))
        row[f'{name}_classes'] = np.bincount(read, minlength=10).tolist()
        if name == 'learned':
          show += list(imgs[:10])
      rows.append(row)
      print(f'class {digit}: {100 * row["learned_correct"]:.1f}% of {prompt!r} samples read as '
            f'{digit} (start embedding: {100 * row["start_correct"]:.1f}%)', flush=True)
    header = (f'Textual inversion, token {c.token} from {c.initializer_token!r}, '
              f'{c.num_images} held-out images per class, {c.num_train_steps} steps each; '
              f'{c.num_samples} samples of {prompt!r}')
    table = ['| class | train s | samples read as the class | with the start embedding | '
             'its 16 training images read as the class | classes read (learned) |',
             '|---|---|---|---|---|---|']
    table += [f'| {r["digit"]} | {r["train_wall_s"]:.0f} | {100 * r["learned_correct"]:.1f}% | '
              f'{100 * r["start_correct"]:.1f}% | {100 * r["training_images_correct"]:.1f}% | '
              f'{r["learned_classes"]} |' for r in rows]
  result['rows'] = rows
  png = os.path.join(out, f'{c.adapter}_quality.png')
  writers.save_image_grid(png, np.stack(show), upscale=2)
  result['grid'] = png
  print(f'\n{header}; job step {ldm_step}; {smp.method}, {smp.num_steps} steps, guidance '
        f'{smp.guidance_scale}')
  print('\n'.join(table))
  report = os.path.join(out, f'{c.adapter}_quality.json')
  with open(report, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'wrote {png} and {report}')


if __name__ == '__main__':
  app.run(main)
