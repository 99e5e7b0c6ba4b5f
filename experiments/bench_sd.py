r"""Stable Diffusion 1.5 inference on this CPU: ours (JAX) against diffusers (PyTorch), same run.

    python experiments/bench_sd.py                       # full SD 1.5 at 512x512, ~30 min on 2 cores
    python experiments/bench_sd.py --size=128 --reps=1   # a quick check of the script

The full-size SD 1.5 architecture (U-Net 859,520,964 parameters, VAE 83,653,863, CLIP ViT-L text
123,060,480) with random weights, float32: written once by diffusers' ``save_pretrained``
(safetensors, 4.3 GB, kept in ``--dir`` for later runs) and loaded by each side as its users do,
ours with ``pipelines.load_pretrained``, the peer with diffusers'
``StableDiffusionPipeline.from_pretrained``, so both run the same weights. Timed, each as the median of ``--reps``
runs after a warm-up: text encoding of a batch of 2 prompts (one prompt and its negative), one
U-Net evaluation at batch 2 and 8 (classifier-free guidance for 1 and 4 images), a VAE decode of
1 and 4 latents, and the whole 20-step DDIM text-to-image of 1 image with guidance 7.5 (ours:
``StableDiffusionPipeline.text_to_image``, one jitted program; diffusers: its
``StableDiffusionPipeline.__call__``). Ours also reports the compile time of each program (first
call minus a later one). Each framework runs in its own worker process, one after the other, so
that its peak RSS (``ru_maxrss``, whole process: weights, activations, compilation) is its own.

    python experiments/bench_sd.py --load [--dir=/tmp/sd15_random]

measures loading alone, each side in its own worker: wall time, RSS once loaded, RSS once every
weight was read (diffusers maps the files, so its pages count only once read) and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
TAG = '@@bench '

UNET = dict(sample_size=64, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
            down_block_types=['CrossAttnDownBlock2D'] * 3 + ['DownBlock2D'],
            up_block_types=['UpBlock2D'] + ['CrossAttnUpBlock2D'] * 3,
            block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, norm_num_groups=32)
VAE = dict(in_channels=3, out_channels=3, down_block_types=['DownEncoderBlock2D'] * 4,
           up_block_types=['UpDecoderBlock2D'] * 4, block_out_channels=[128, 256, 512, 512],
           layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512,
           scaling_factor=0.18215)
CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act='quick_gelu',
            projection_dim=768, layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=1)
DDIM = dict(_class_name='DDIMScheduler', beta_start=0.00085, beta_end=0.012,
            beta_schedule='scaled_linear', num_train_timesteps=1000, clip_sample=False,
            set_alpha_to_one=False, steps_offset=1)
PROMPT, NEGATIVE = 'a photo of an astronaut riding a horse on the moon', 'blurry'


def _timed(fn, reps: int) -> tuple[float, float]:
  """(first call, median of ``reps`` later calls) in seconds."""
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return first, statistics.median(times)


def _tokenizer_dir() -> pathlib.Path:
  sys.path.insert(0, str(REPO / 'tests'))
  import sd_fixtures  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(tempfile.mkdtemp()) / 'tokenizer'
  sd_fixtures.write_clip_tokenizer(path)
  return path


def jax_worker(args) -> dict:
  from diffusion_jax import cpu_runtime  # pylint: disable=import-outside-toplevel
  cpu_runtime.configure()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from diffusion_jax import pipelines  # pylint: disable=import-outside-toplevel

  h = args.size // 8
  pipe = pipelines.load_pretrained(args.dir)  # the same weights as the peer's, as a user loads
  unet, vae, text, params = pipe.unet, pipe.vae, pipe.text_encoders[0], pipe.params
  ids = jnp.ones((2, 77), jnp.int32)
  out = {}
  enc = jax.jit(lambda p, i: text.apply({'params': p}, i)['last_hidden_state'])
  first, med = _timed(lambda: enc(params['text_encoder'], ids).block_until_ready(), args.reps)
  out['text encoding, batch 2'] = (med, first - med)
  step = jax.jit(lambda p, x, t, c: unet.apply({'params': p}, x, t, c))
  for b in (2, 8):
    x, t, c = jnp.ones((b, h, h, 4)), jnp.full((b,), 500.0), jnp.zeros((b, 77, 768))
    first, med = _timed(lambda: step(params['unet'], x, t, c).block_until_ready(), args.reps)
    out[f'U-Net step, batch {b}'] = (med, first - med)
  dec = jax.jit(lambda p, z: vae.apply({'params': p}, z, method=vae.decode))
  for b in (1, 4):
    z = jnp.ones((b, h, h, 4))
    first, med = _timed(lambda: dec(params['vae'], z).block_until_ready(), args.reps)
    out[f'VAE decode, batch {b}'] = (med, first - med)
  latents = np.random.default_rng(0).standard_normal((1, h, h, 4)).astype(np.float32)
  run = lambda: pipe.text_to_image(PROMPT, negative_prompt=NEGATIVE, num_steps=20,  # noqa: E731
                                   latents=latents, height=args.size,
                                   width=args.size).block_until_ready()
  first, med = _timed(run, max(1, args.reps // 2))
  out['txt2img 20 steps, 1 image'] = (med, first - med)
  return out


def torch_worker(args) -> dict:
  import diffusers  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_grad_enabled(False)
  h = args.size // 8
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(args.dir, safety_checker=None,
                                                           requires_safety_checker=False)
  unet, vae, text = pipe.unet.eval(), pipe.vae.eval(), pipe.text_encoder.eval()
  out = {}
  ids = torch.ones((2, 77), dtype=torch.long)
  _, med = _timed(lambda: text(ids), args.reps)
  out['text encoding, batch 2'] = (med, None)
  for b in (2, 8):
    x, t, c = torch.ones((b, 4, h, h)), torch.full((b,), 500.0), torch.zeros((b, 77, 768))
    _, med = _timed(lambda: unet(x, t, c), args.reps)
    out[f'U-Net step, batch {b}'] = (med, None)
  for b in (1, 4):
    z = torch.ones((b, 4, h, h))
    _, med = _timed(lambda: vae.decode(z), args.reps)
    out[f'VAE decode, batch {b}'] = (med, None)
  pipe.set_progress_bar_config(disable=True)
  latents = torch.from_numpy(
      np.random.default_rng(0).standard_normal((1, h, h, 4)).astype(np.float32).transpose(
          0, 3, 1, 2).copy())
  run = lambda: pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=20,  # noqa: E731
                     latents=latents, height=args.size, width=args.size, output_type='np')
  _, med = _timed(run, max(1, args.reps // 2))
  out['txt2img 20 steps, 1 image'] = (med, None)
  return out


def write_worker(args) -> dict:
  """Writes the random SD 1.5 pipeline (diffusers' save_pretrained) into ``args.dir``."""
  import diffusers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  ddim = {k: v for k, v in DDIM.items() if not k.startswith('_')}
  pipe = diffusers.StableDiffusionPipeline(
      unet=diffusers.UNet2DConditionModel(**UNET), vae=diffusers.AutoencoderKL(**VAE),
      text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)),
      tokenizer=transformers.CLIPTokenizer.from_pretrained(_tokenizer_dir()),
      scheduler=diffusers.DDIMScheduler(**ddim), safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  pipe.save_pretrained(args.dir, safe_serialization=True)
  return {}


def load_worker(args) -> dict:
  """Loads ``args.dir`` with this worker's framework: wall time and RSS once loaded."""
  def rss_gib():
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**30
  if args.worker == 'load-jax':
    from diffusion_jax import cpu_runtime, pipelines  # pylint: disable=import-outside-toplevel
    cpu_runtime.configure()
    import jax  # pylint: disable=import-outside-toplevel
    jax.devices()  # the backend starts outside the timed load
    t = time.perf_counter()
    pipe = pipelines.load_pretrained(args.dir)
    jax.block_until_ready(pipe.params)
  else:
    import diffusers  # pylint: disable=import-outside-toplevel
    t = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(args.dir, safety_checker=None,
                                                             requires_safety_checker=False)
  seconds = time.perf_counter() - t
  loaded = rss_gib()
  # diffusers maps the files: their pages count once read. Read every weight on both sides.
  if args.worker == 'load-jax':
    total = sum(float(x.sum()) for x in jax.tree.leaves(pipe.params))
  else:
    total = sum(float(p.sum()) for m in (pipe.unet, pipe.vae, pipe.text_encoder)
                for p in m.parameters())
  del total
  return {'load (s)': seconds, 'RSS once loaded (GiB)': loaded,
          'RSS once every weight was read (GiB)': rss_gib()}


def _run_worker(kind: str, args) -> dict:
  cmd = [sys.executable, __file__, f'--worker={kind}', f'--size={args.size}', f'--reps={args.reps}',
         f'--dir={args.dir}']
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                        env={**os.environ, 'PYTHONPATH': str(REPO)})
  lines = [l for l in proc.stdout.splitlines() if l.startswith(TAG)]
  if proc.returncode or not lines:
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    raise SystemExit(f'{kind} worker failed')
  return json.loads(lines[-1][len(TAG):])


def load_main(args) -> None:
  res = {fw: _run_worker(f'load-{fw}', args) for fw in args.frameworks.split(',')}
  jx, th = res.get('jax'), res.get('torch')
  print(f'Loading the SD 1.5 pipeline from {args.dir} (float32 safetensors), {os.cpu_count()} CPUs')
  print('| measurement | ours | diffusers | ours/theirs |')
  print('|---|---:|---:|---:|')
  rows = [(name, jx['times'][name] if jx else float('nan'),
           th['times'][name] if th else float('nan')) for name in (jx or th)['times']]
  rows.append(('peak RSS of the worker (GiB)', jx['peak_gib'] if jx else float('nan'),
               th['peak_gib'] if th else float('nan')))
  for name, a, b in rows:
    print(f'| {name} | {a:.2f} | {b:.2f} | {a / b:.2f} |')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', type=int, default=512, help='image side in pixels (512: SD 1.5).')
  parser.add_argument('--reps', type=int, default=3, help='timed runs per measurement.')
  parser.add_argument('--frameworks', default='jax,torch')
  parser.add_argument('--load', action='store_true', help='measure loading a saved pipeline.')
  parser.add_argument('--dir', default=os.path.join(tempfile.gettempdir(), 'sd15_random'),
                      help='where --load keeps the random SD 1.5 pipeline it writes once.')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    workers = {'jax': jax_worker, 'torch': torch_worker, 'write': write_worker,
               'load-jax': load_worker, 'load-torch': load_worker}
    result = workers[args.worker](args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(TAG + json.dumps({'times': result, 'peak_gib': peak}), flush=True)
    return
  if not os.path.exists(os.path.join(args.dir, 'model_index.json')):
    print(f'writing the random SD 1.5 pipeline to {args.dir} ...', flush=True)
    _run_worker('write', args)
  if args.load:
    load_main(args)
    return
  results = {fw: _run_worker(fw, args) for fw in args.frameworks.split(',')}
  print(f'SD 1.5 architecture, random weights, float32, {args.size}x{args.size}, '
        f'{os.cpu_count()} CPUs; median of {args.reps} (txt2img {max(1, args.reps // 2)})')
  print(f'| {"measurement":28s} | ours (s) | diffusers (s) | speed ours/theirs | ours compile (s) |')
  print('|---|---:|---:|---:|---:|')
  jx, th = results.get('jax'), results.get('torch')
  names = (jx or th)['times'].keys()
  for name in names:
    a = jx['times'][name][0] if jx else float('nan')
    b = th['times'][name][0] if th else float('nan')
    compile_s = jx['times'][name][1] if jx else float('nan')
    print(f'| {name:28s} | {a:8.3f} | {b:13.3f} | {b / a:17.2f}x | {compile_s:16.1f} |')
  pa = jx['peak_gib'] if jx else float('nan')
  pb = th['peak_gib'] if th else float('nan')
  print(f'| {"peak RSS (GiB), whole run":28s} | {pa:8.2f} | {pb:13.2f} | memory ours/theirs '
        f'{pa / pb:.2f} | |')


if __name__ == '__main__':
  main()
