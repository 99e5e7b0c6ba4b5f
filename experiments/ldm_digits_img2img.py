r"""img2img (SDEdit) with a text prompt on the latent digits model: real 3s edited toward "eight".

    python experiments/ldm_digits_img2img.py --workdir=runs/ldm_digits

Takes the trained two-stage job of ``configs/ldm_digits.py`` (run it first), the held-out
writers' real single 3s (``digits_text_examples('test_singles')``), encodes them with the job's
autoencoder (posterior mean, scaled as in training), and runs ``editing.img2img`` with the prompt
"the digit eight" (classifier-free guidance against the empty prompt) at each ``--strengths``:
DDIM on a 50-step grid, of which the last ``int(50 strength)`` steps run (diffusers' count).
Prints, per strength, the share of edits that ``experiments/digit_classifier.py`` reads as 8 and as
3, and the RMS pixel distance to the input (images in [-1, 1]).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKDIR = flags.DEFINE_string('workdir', 'runs/ldm_digits', 'The ldm_digits job directory.')
_STRENGTHS = flags.DEFINE_list('strengths', ['0.3', '0.6', '0.9'], 'SDEdit strengths.')
_GUIDANCE = flags.DEFINE_float('guidance_scale', 6.0, 'Classifier-free guidance weight.')
_STEPS = flags.DEFINE_integer('num_steps', 50, 'Steps of the full grid.')


def main(argv) -> None:
  del argv
  from diffusion_jax import cpu_runtime  # pylint: disable=import-outside-toplevel
  cpu_runtime.configure()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from diffusion_jax import configs, editing, input_pipeline, preconditioning  # pylint: disable=import-outside-toplevel
  from diffusion_jax.training import latent  # pylint: disable=import-outside-toplevel
  from experiments import digit_classifier  # pylint: disable=import-outside-toplevel

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = configs.load(os.path.join(repo, 'configs', 'ldm_digits.py')).get_config()
  (s, params, step), _ = latent.restore(config, _WORKDIR.value)
  s.checkpointer.close()
  lm, cfg = s.latent, s.config
  data = input_pipeline.digits_text_examples('test_singles')
  threes = data.images[data.digits[:, 0] == 3]
  prediction = preconditioning.prediction_type(cfg.model.parameterization)
  model_fn = preconditioning.make_model_fn(s.network_fn, params, s.process,
                                           parameterization=cfg.model.parameterization,
                                           noise_input_kind=cfg.model.noise_input)

  def cond_of(prompts):
    ids = jnp.asarray(lm.tokenize(prompts))
    if lm.trains_text:
      return {'input_ids': ids}
    return {'context': lm.text.apply({'params': lm.text_params}, ids)['last_hidden_state']}

  n = len(threes)
  cond, null = cond_of(['the digit eight'] * n), cond_of([''] * n)
  mean, _ = lm.vae.apply({'params': lm.vae_params}, jnp.asarray(threes), method=lm.vae.encode)
  z0 = lm.scale * (mean - lm.shift)
  print(f'ldm_digits step {step}: {n} real 3s of held-out writers, prompt "the digit eight", '
        f'guidance {_GUIDANCE.value}, DDIM {_STEPS.value}-step grid')
  print('| strength | steps run | classified 8 | classified 3 | RMS distance to input |')
  print('|---|---|---|---|---|')
  for strength in [0.0] + [float(v) for v in _STRENGTHS.value]:
    z = editing.img2img(model_fn, s.process, z0, strength=strength, method='ddim',
                        num_steps=_STEPS.value, key=jax.random.key(0), cond=cond, null_cond=null,
                        guidance_scale=_GUIDANCE.value, prediction=prediction)
    x = lm.vae.apply({'params': lm.vae_params}, z / lm.scale + lm.shift, method=lm.vae.decode)
    x = np.clip(np.asarray(x), -1.0, 1.0)
    labels, _ = digit_classifier.classify_single(x)
    rms = float(np.sqrt(np.mean((x - threes) ** 2)))
    print(f'| {strength:.1f} | {int(_STEPS.value * strength)} | {np.mean(labels == 8):.2f} | '
          f'{np.mean(labels == 3):.2f} | {rms:.3f} |', flush=True)


if __name__ == '__main__':
  app.run(main)
