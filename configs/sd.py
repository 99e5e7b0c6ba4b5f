r"""Text-to-image with a pretrained Stable Diffusion 1.x / 2.x / XL directory (diffusers format).

    python -m diffusion_jax.main --config=configs/sd.py --workdir=runs/sd --mode=txt2img \
        --config.pretrained=/path/to/stable-diffusion-v1-5 \
        --config.sampling.prompt="a watercolor painting of a fox"

``pretrained`` is a local directory as diffusers' ``save_pretrained`` writes it (model_index.json,
unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL also text_encoder_2/, tokenizer_2/),
weights as .safetensors: nothing is downloaded. ``sampling.method=''`` runs the directory's own
scheduler step for step as diffusers does; any name of ``sampling.METHODS`` runs that sampler on
the same model. Writes ``samples/txt2img_<method>_<steps>.png`` and ``.npz`` (``images`` uint8
[N, H, W, 3], ``prompts`` [N]); ``sampling.prompts_file`` gives one prompt per line.
"""

from diffusion_jax.configs import default


def get_config():
  config = default.get_config()
  config.sampling.method = ''  # the scheduler of the pretrained directory
  config.sampling.num_steps = 50
  config.sampling.guidance_scale = 7.5
  config.sampling.num_samples = 1  # images per prompt
  config.sampling.batch_size = 1  # images per compiled call
  return config
