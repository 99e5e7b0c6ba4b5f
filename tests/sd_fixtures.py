"""Tiny random-weight Stable Diffusion pipelines written with diffusers' own ``save_pretrained``.

No weights can be downloaded, so the parity tests build their references here: a CLIP-format BPE
vocabulary learned from a small corpus (``vocab.json`` / ``merges.txt`` as CLIP ships them), tiny
diffusers / transformers networks with seeded random weights, saved as safetensors into a
directory that both diffusers and our ``pipelines.load_pretrained`` read.
"""

from __future__ import annotations

import collections
import json
import pathlib

import torch

CORPUS = ('a photo of an astronaut riding a horse on the moon, painted in watercolor. '
          'the digit seven and the digits three and eight; a red fox in the snow, high quality, '
          'blurry, low resolution, ugly. Café, naïve façade: déjà vu! 東京 タワー 🚀🚀 OK?! 2024 '
          "it's we're they'll i'd you've")

SPECIALS = ('<|startoftext|>', '<|endoftext|>')


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable unicode character table (CLIP uses the same)."""
  bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(
      range(ord('®'), ord('ÿ') + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def learn_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
  """Greedy BPE merges over the words of ``text`` (lower case, byte-level, ``</w>`` at word end)."""
  table = bytes_to_unicode()
  words = collections.Counter(text.lower().split())
  seqs = {}
  for w, c in words.items():
    symbols = [table[b] for b in w.encode('utf-8')]
    symbols[-1] += '</w>'
    seqs[tuple(symbols)] = c
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for seq, c in seqs.items():
      for a, b in zip(seq, seq[1:]):
        pairs[(a, b)] += c
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    new = {}
    for seq, c in seqs.items():
      out, i = [], 0
      while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
          out.append(seq[i] + seq[i + 1])
          i += 2
        else:
          out.append(seq[i])
          i += 1
      new[tuple(out)] = new.get(tuple(out), 0) + c
    seqs = new
  return merges


def write_clip_tokenizer(directory: pathlib.Path, *, pad_token: str = '<|endoftext|>',
                         num_merges: int = 120) -> int:
  """Writes a CLIP-format tokenizer (vocab.json, merges.txt, configs); returns the vocab size."""
  directory.mkdir(parents=True, exist_ok=True)
  chars = list(bytes_to_unicode().values())
  merges = learn_merges(CORPUS, num_merges)
  tokens = chars + [c + '</w>' for c in chars] + [a + b for a, b in merges] + list(SPECIALS)
  vocab = {}
  for t in tokens:
    vocab.setdefault(t, len(vocab))
  (directory / 'vocab.json').write_text(json.dumps(vocab, ensure_ascii=False))
  (directory / 'merges.txt').write_text(
      '#version: 0.2\n' + '\n'.join(f'{a} {b}' for a, b in merges) + '\n', encoding='utf-8')
  (directory / 'special_tokens_map.json').write_text(json.dumps(
      {'bos_token': SPECIALS[0], 'eos_token': SPECIALS[1], 'unk_token': SPECIALS[1],
       'pad_token': pad_token}))
  (directory / 'tokenizer_config.json').write_text(json.dumps(
      {'tokenizer_class': 'CLIPTokenizer', 'model_max_length': 77, 'bos_token': SPECIALS[0],
       'eos_token': SPECIALS[1], 'unk_token': SPECIALS[1], 'pad_token': pad_token,
       'do_lower_case': True}))
  return len(vocab)


def _text_encoder(vocab_size: int, eos_token_id: int, *, projection: bool, hidden_act: str,
                  hidden_size: int = 32, seed: int = 0):
  import transformers  # pylint: disable=import-outside-toplevel
  config = transformers.CLIPTextConfig(
      vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=3,
      num_attention_heads=4, max_position_embeddings=77, hidden_act=hidden_act,
      projection_dim=hidden_size, bos_token_id=vocab_size - 2, eos_token_id=eos_token_id,
      pad_token_id=1, layer_norm_eps=1e-5)
  torch.manual_seed(seed)
  cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
  return cls(config).eval()


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Every parameter random (diffusers zero-inits some output convs, which would hide bugs).

  Matrices and kernels ~ N(0, 1 / fan_in); 1-D weights (norm scales) 1 + N(0, 0.1^2); biases
  N(0, 0.1^2).
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim > 1:
        p.copy_(noise / (p[0].numel() ** 0.5))
      elif name.endswith('weight'):
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)
  return module.eval()


def make_scheduler(name: str, **overrides):
  """A diffusers scheduler with SD 1.5's settings (scaled_linear 0.00085..0.012, leading, offset 1)."""
  import diffusers  # pylint: disable=import-outside-toplevel
  base = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
              num_train_timesteps=1000)
  extra = {'DDIMScheduler': dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
           'PNDMScheduler': dict(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1),
           'EulerDiscreteScheduler': dict(steps_offset=1, timestep_spacing='leading'),
           'DPMSolverMultistepScheduler': dict(steps_offset=1),
           'UniPCMultistepScheduler': dict(steps_offset=1)}[name]
  return getattr(diffusers, name)(**{**base, **extra, **overrides})


def make_sd_pipeline(directory: pathlib.Path, *, kind: str = 'sd', scheduler: str = 'DDIMScheduler',
                     seed: int = 0, inpainting: bool = False, **scheduler_overrides):
  """Builds, saves (safetensors) and returns a tiny diffusers SD ('sd') or SDXL ('sdxl') pipeline.

  Latents are 8x8x4 for 16x16 images (VAE factor 2). ``inpainting``: an SD inpainting pipeline
  (``StableDiffusionInpaintPipeline``) whose U-Net takes 9 channels (latents, mask, masked
  image's latents).
  """
  import diffusers  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  directory = pathlib.Path(directory)
  tok_dir = directory.parent / f'_{directory.name}_tokenizer'
  vocab_size = write_clip_tokenizer(tok_dir)
  eos = vocab_size - 1
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
  vae = _randomize(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, block_out_channels=(16, 32),
      down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
      latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=16), seed + 1)
  if kind == 'sd':
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=9 if inpainting else 4, out_channels=4,
        block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8)
    text_encoder = _text_encoder(vocab_size, eos, projection=False, hidden_act='quick_gelu',
                                 seed=seed + 2)
    cls = (diffusers.StableDiffusionInpaintPipeline if inpainting
           else diffusers.StableDiffusionPipeline)
    pipe = cls(
        unet=_randomize(unet, seed + 3), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=make_scheduler(scheduler, **scheduler_overrides), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
  elif kind == 'sdxl':
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
        up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), cross_attention_dim=64,
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), norm_num_groups=8,
        use_linear_projection=True, addition_embed_type='text_time', addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32)
    text_encoder = _text_encoder(vocab_size, eos, projection=False, hidden_act='quick_gelu',
                                 seed=seed + 2)
    text_encoder_2 = _text_encoder(vocab_size, eos, projection=True, hidden_act='gelu',
                                   seed=seed + 4)
    pipe = diffusers.StableDiffusionXLPipeline(
        unet=_randomize(unet, seed + 3), vae=vae, text_encoder=text_encoder,
        text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(tok_dir),
        scheduler=make_scheduler(scheduler, **scheduler_overrides))
  else:
    raise ValueError(kind)
  pipe.save_pretrained(directory, safe_serialization=True)
  return pipe
