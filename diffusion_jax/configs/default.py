"""Every config field, with its default and meaning. Other configs import this and override.

    python -m diffusion_jax.main --config=diffusion_jax/configs/default.py --workdir=runs/default

(runs the digits job at default model size; configs/digits.py is the tuned one). Experiment
configs (the repository's top-level configs/) do ``from diffusion_jax.configs import default``, so
they load from any working directory once the package is installed. The config is locked:
assigning a field that is not defined here raises, so a typo in a config file or in a
``--config.a.b=value`` override stops the run before anything is compiled. This module imports
only ml_collections: loading a config starts no JAX backend.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # PRNG seed of the parameters, the training noise and the data order.
  config.pretrained = ''  # a local diffusers-format pipeline directory (model_index.json), e.g. for --mode=txt2img.

  # --- data -------------------------------------------------------------------------------------
  data = config.data = ml_collections.ConfigDict()
  data.source = 'digits'  # 'digits' | 'folder' | 'array' | 'tfds' | 'digits_text' (captioned, 32x32).
  data.path = ''  # folder: directory of images; array: a .npy/.npz file.
  data.name = ''  # tfds: data set name, e.g. 'cifar10'.
  data.split = 'train'  # tfds: training split; digits_text: 'train' (input_pipeline.DIGITS_TEXT_SPLITS).
  data.eval_split = 'test'  # tfds: split of --mode=eval (bits/dim).
  data.data_dir = ''  # tfds: data directory ('' = TFDS's default, ~/tensorflow_datasets).
  data.image_size = 8  # side of the square images (digits are 8x8 natively; resized otherwise).
  data.num_channels = 1  # 1 (grayscale) or 3 (RGB) for images; ignored for 'array'.
  data.random_flip = False  # random horizontal flips (images only).
  data.use_labels = False  # read labels (needed for class conditioning, model.num_classes > 0).
  data.worker_count = 0  # grain worker processes for decoding (0: in the main process).
  data.background = (255, 255, 255)  # RGB that transparent pixels are composited onto.
  # folder captions: '' (images only) | 'txt' (a.png captioned by a.txt) | 'metadata' (imagefolder).
  data.captions = ''
  data.text_key = ''  # caption field: .npz key (array), text feature (tfds), metadata column.

  # --- network and its parameterization ---------------------------------------------------------
  model = config.model = ml_collections.ConfigDict()
  model.name = 'unet'  # 'unet' (images [B, H, W, C]) | 'mlp' (vectors [B, D]).
  model.parameterization = 'eps'  # the network predicts 'eps' | 'x0' | 'v' | 'score' (F/sigma) | 'flow' (eps - x0).
  model.noise_input = 't'  # network input: 't' (DDPM step) | 't999' (999 t, VP SDEs) | 'log_sigma' (VE).
  model.num_classes = 0  # classes for class conditioning; 0 = unconditional.
  model.dtype = 'float32'  # compute dtype: 'float32' | 'bfloat16' (params stay float32).
  unet = model.unet = ml_collections.ConfigDict()  # fields of diffusion_jax.models.UNet.
  unet.ch = 64  # base channels.
  unet.ch_mult = (1, 2)  # channel multiplier per level; len-1 downsamplings.
  unet.num_res_blocks = 2  # residual blocks per level.
  unet.attn_resolutions = (4,)  # spatial sizes with self-attention.
  unet.dropout = 0.1  # dropout in residual blocks.
  unet.resamp_with_conv = True  # learned resampling convs (ddpm blocks).
  unet.resblock_type = 'ddpm'  # 'ddpm' | 'biggan' (DDPM++/NCSN++).
  unet.skip_rescale = False  # divide residual sums by sqrt(2) (DDPM++).
  unet.embedding_type = 'sinusoidal'  # 'sinusoidal' | 'fourier' (NCSN++, with log_sigma input).
  unet.fourier_scale = 16.0  # std of the Gaussian Fourier frequencies.
  unet.num_heads = 1  # attention heads.
  unet.num_head_channels = 0  # channels per head; 0 = use num_heads.
  unet.fir = False  # FIR up/downsampling (NCSN++).
  unet.progressive = 'none'  # output pyramid: 'none' | 'output_skip' | 'residual'.
  unet.progressive_input = 'none'  # input pyramid: 'none' | 'input_skip' | 'residual'.
  unet.progressive_combine = 'sum'  # 'sum' | 'cat'.
  unet.init_scale = 0.0  # scale of the last conv of each block (0 = zero init, as DDPM).
  unet.up_attn_every_block = True  # attention after every up block (DDPM) or once per level.
  unet.remat_policy = 'none'  # 'none' | 'full' | 'dots_saveable' | 'dots_with_no_batch_dims_saveable'.
  # attention implementation: 'auto' (per-backend default) | 'xla' | 'cudnn' | 'einsum' | 'chunked'.
  unet.attention = 'auto'
  mlp = model.mlp = ml_collections.ConfigDict()  # fields of diffusion_jax.models.MLP.
  mlp.hidden_dim = 256  # width.
  mlp.num_layers = 4  # hidden layers.
  mlp.embed_dim = 128  # noise-embedding width.
  # training.task='latent_diffusion' / 'ldm': the text-conditioned U-Net (diffusers' UNet2DConditionModel keys).
  cond_unet = model.cond_unet = ml_collections.ConfigDict()
  cond_unet.block_out_channels = (64, 128)  # channels per level.
  cond_unet.layers_per_block = 1  # resnets per down level (up levels: one more).
  cond_unet.down_block_types = ('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D')  # per level: 'CrossAttnDownBlock2D' | 'DownBlock2D'.
  cond_unet.up_block_types = ('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D')  # per level, lowest resolution first.
  cond_unet.mid_block_type = 'UNetMidBlock2DCrossAttn'  # 'UNetMidBlock2DCrossAttn' | 'UNetMidBlock2D' | '' (none).
  cond_unet.attention_head_dim = 4  # diffusers' name for the number of attention heads (SD 1.x: 8).
  cond_unet.transformer_layers_per_block = 1  # transformer blocks per spatial transformer.
  cond_unet.use_linear_projection = True  # Linear proj_in/proj_out (SD 2.x, XL) rather than 1x1 convs (SD 1.x).
  cond_unet.norm_num_groups = 32  # GroupNorm groups.
  cond_unet.attention = 'auto'  # attention implementation ('auto' | 'xla' | 'cudnn' | 'einsum' | 'chunked').
  cond_unet.remat_policy = 'none'  # 'none' | 'full' | 'dots_saveable' | 'dots_with_no_batch_dims_saveable'.
  text_encoder = model.text_encoder = ml_collections.ConfigDict()  # latent diffusion's text encoder.
  text_encoder.source = 'vocab'  # 'vocab' (word vocabulary of the captions, a small CLIP-style transformer trained jointly) | 'pretrained' (frozen CLIP).
  text_encoder.path = ''  # 'pretrained': a diffusers directory with tokenizer/ and text_encoder/.
  text_encoder.max_length = 0  # tokens per caption incl. start/end (0: vocab, longest caption + 2; pretrained, the tokenizer's 77).
  text_encoder.hidden_size = 64  # 'vocab': width (the U-Net's cross-attention dim).
  text_encoder.intermediate_size = 128  # 'vocab': MLP width.
  text_encoder.num_layers = 2  # 'vocab': transformer layers.
  text_encoder.num_heads = 4  # 'vocab': attention heads.

  # --- noise process ----------------------------------------------------------------------------
  process = config.process = ml_collections.ConfigDict()
  process.type = 'discrete'  # 'discrete' (DDPM) | 'vp' | 'subvp' | 've' (score SDEs) | 'rectified_flow'.
  process.schedule = 'linear'  # discrete: 'linear' | 'cosine'.
  process.num_timesteps = 1000  # discrete: number of steps N.
  process.beta_start = 1e-4  # discrete linear: first beta.
  process.beta_end = 0.02  # discrete linear: last beta.
  process.cosine_s = 0.008  # discrete cosine: offset s of Nichol & Dhariwal.
  process.beta_min = 0.1  # vp/subvp: beta(0).
  process.beta_max = 20.0  # vp/subvp: beta(1).
  process.sigma_min = 0.01  # ve: sigma(0).
  process.sigma_max = 50.0  # ve: sigma(1).
  process.t_eps = 1e-3  # vp/subvp/ve: smallest time t_min (score_sde: 1e-3 VP, 1e-5 VE); rectified_flow: t in [t_eps, 1 - t_eps].

  # --- training ---------------------------------------------------------------------------------
  training = config.training = ml_collections.ConfigDict()
  training.batch_size = 128  # global batch (over all devices and processes).
  training.num_train_steps = 4000  # optimizer steps.
  training.log_every = 100  # steps between metrics.jsonl / TensorBoard entries.
  training.checkpoint_every = 1000  # steps between checkpoints (one is also written at the end).
  training.keep_checkpoints = 3  # checkpoints kept (the newest good one is never deleted).
  training.sample_every = 2000  # steps between PNG grids of EMA samples (0 = only at the end).
  training.num_sample_images = 64  # images in each training-time grid.
  training.ema_decay = 0.999  # EMA decay per step.
  training.weighting = 'uniform'  # loss weighting: 'uniform' | 'snr' | 'min_snr' | 'likelihood'.
  training.min_snr_gamma = 5.0  # gamma of 'min_snr'.
  training.time_sampling = 'uniform'  # 'uniform' | 'importance' | 'logit_normal' (SD3: t = sigmoid(N(mean, std^2))).
  training.logit_normal_mean = 0.0  # 'logit_normal': mean m of the logit of t (Esser et al. 2024: 0).
  training.logit_normal_std = 1.0  # 'logit_normal': std s of the logit of t (Esser et al. 2024: 1).
  training.label_dropout = 0.1  # P(label -> null) for classifier-free guidance (class models).
  training.steps_per_call = 1  # train steps per jitted call (lax.scan), for host-bound runs.
  training.max_nonfinite_steps = 20  # stop after this many consecutive non-finite (skipped) steps.
  training.compilation_cache_dir = ''  # persistent XLA compilation cache ('' = workdir/.jax_cache).
  # checkpoint directory (a run's checkpoints/ or one step's directory) whose EMA parameters start
  # training; ignored when the workdir already has a checkpoint.
  training.init_from = ''
  # 'denoising' (pixel/vector diffusion) | 'autoencoder' (latent diffusion's stage 1) | 'latent_diffusion' (stage 2, autoencoder.path frozen) | 'ldm' (both: WORKDIR/autoencoder, WORKDIR/ldm).
  training.task = 'denoising'
  training.text_dropout = 0.1  # latent diffusion: P(caption -> empty prompt) for classifier-free guidance.
  training.cache_latents = False  # latent diffusion: encode the data set once (posterior mean/log-variance); later epochs skip the autoencoder.
  training.cache_text = False  # with cache_latents and a frozen text encoder: cache the caption embeddings too.

  # --- autoencoder (latent diffusion; training.task 'autoencoder' trains it, 'latent_diffusion' reads it) ---
  autoencoder = config.autoencoder = ml_collections.ConfigDict()  # AutoencoderKL fields and stage-1 losses.
  autoencoder.path = ''  # stage 2: a diffusers-format vae/ directory ('' with task 'ldm': WORKDIR/autoencoder/vae).
  autoencoder.block_out_channels = (32, 64, 64)  # channels per level; latents are 2^(levels-1) times smaller.
  autoencoder.layers_per_block = 1  # resnets per encoder level.
  autoencoder.latent_channels = 4  # latent channels.
  autoencoder.norm_num_groups = 16  # GroupNorm groups.
  autoencoder.mid_block_add_attention = True  # self-attention in the mid blocks.
  autoencoder.rec_loss = 'l1'  # 'l1' (LDM) | 'l2', summed over pixels.
  autoencoder.kl_weight = 1e-6  # weight of KL(q(z|x) || N(0, I)) (LDM: 1e-6).
  autoencoder.disc_weight = 0.0  # patch discriminator's factor of Esser et al.'s adaptive weight (LDM: 0.5; 0 = no discriminator).
  autoencoder.disc_start = 0  # step from which the discriminator trains and its loss counts.
  autoencoder.disc_channels = 64  # discriminator's first conv width.
  autoencoder.disc_layers = 3  # discriminator's stride-2 conv layers.
  autoencoder.sample_posterior = True  # stage 2 trains on posterior samples (LDM) rather than means.
  autoencoder.scale_examples = 1024  # training images whose latents' std gives the scale factor (1 / std).
  autoencoder.num_train_steps = 2000  # task 'ldm': stage-1 steps.
  autoencoder.learning_rate = 1e-3  # task 'ldm': stage-1 peak learning rate.
  autoencoder.batch_size = 0  # task 'ldm': stage-1 global batch (0 = training.batch_size).

  # --- optimizer --------------------------------------------------------------------------------
  optim = config.optim = ml_collections.ConfigDict()
  optim.optimizer = 'adam'  # 'adam' | 'adamw'.
  optim.learning_rate = 2e-3  # peak learning rate.
  optim.warmup_steps = 200  # linear warmup steps.
  optim.schedule = 'constant'  # after warmup: 'constant' | 'cosine' | 'linear' (decay to 0).
  optim.b1 = 0.9  # Adam beta1.
  optim.b2 = 0.999  # Adam beta2.
  optim.eps = 1e-8  # Adam epsilon.
  optim.weight_decay = 0.0  # decoupled weight decay (adamw only).
  optim.grad_clip = 1.0  # global-norm gradient clipping (0 = off).

  # --- sampling ---------------------------------------------------------------------------------
  sampling = config.sampling = ml_collections.ConfigDict()
  sampling.method = 'dpmpp_2m'  # a name of diffusion_jax.sampling.METHODS.
  sampling.num_steps = 50  # sampler steps.
  sampling.num_samples = 1000  # --mode=sample: number of samples written to the .npz.
  sampling.batch_size = 500  # samples per sampler call.
  sampling.guidance_scale = 1.0  # classifier-free guidance scale (1 = plain conditional).
  sampling.grid = ''  # time grid: '' (the method's default) | 'uniform' | 'logsnr' | 'karras' | 'quadratic' | 'cosine' | 'optimized'.
  sampling.spacing = ''  # grid ends: '' (the grid's default) | 'trailing' (last step to data as long as the others; best at <= 10 steps) | 'linspace' | 'leading' (uniform only).
  sampling.shift = 1.0  # time shift of every grid, t' = shift t / (1 + (shift - 1) t) on [t_min, t_max] rescaled to [0, 1] (SD3: 3.0; 1 = none).
  sampling.eta = 0.0  # ddim: stochasticity (0 = deterministic DDIM, 1 = DDPM-like).
  sampling.order = 0  # multistep order, 0 = the method's default: plms 1-4 (4), unipc 1-3 (2), dpmpp_* 1 up to their own.
  sampling.warm_start = 'heun'  # plms: 'heun' (PNDM, NFE = num_steps + 1) | 'ab' (iPNDM: Euler first step, NFE = num_steps; the more accurate at <= 20 NFE).
  sampling.analytic_first_step = False  # plms with warm_start='ab': first step's eps in closed form for N(0, I) data (AMED's AFS), NFE = num_steps - 1.
  sampling.clip_x0 = False  # clip predicted x0 to [-1, 1] (images only).
  sampling.predictor = 'reverse_diffusion'  # pc: 'reverse_diffusion' | 'euler_maruyama' | 'ancestral' | 'none'.
  sampling.corrector = 'langevin'  # pc: 'langevin' | 'ald' | 'none'.
  sampling.snr = 0.16  # pc: signal-to-noise ratio of the Langevin corrector.
  sampling.rtol = 1e-5  # ode: relative tolerance of the adaptive PF-ODE solver.
  sampling.atol = 1e-5  # ode: absolute tolerance.
  sampling.image = ''  # --mode=img2img/inpaint/invert: the input image (PNG or any file load_image reads).
  sampling.mask = ''  # --mode=inpaint: mask image of the input's size, white = keep, black = generate (diffusers: the opposite).
  sampling.strength = 0.8  # --mode=img2img: SDEdit strength in [0, 1], the last int(num_steps * strength) steps run.
  sampling.label = -1  # --mode=img2img/inpaint/invert, class-conditional models: the class; -1: every class in turn (invert: the null class).
  sampling.resample = 1  # --mode=inpaint: RePaint's resamplings per step (> 1 needs sampling.method 'ddpm' or 'ddim').
  sampling.prompt = ''  # text-to-image: one prompt (or use prompts_file).
  sampling.prompts_file = ''  # text-to-image: a text file, one prompt per line (num_samples images each).
  sampling.negative_prompt = ''  # --mode=txt2img: the negative prompt of classifier-free guidance ('' = the empty prompt).
  sampling.guidance_rescale = 0.0  # --mode=txt2img: phi of Lin et al. (2024), eq. 16 (diffusers' guidance_rescale).
  sampling.height = 0  # --mode=txt2img: image height in pixels (0 = the model's default size).
  sampling.width = 0  # --mode=txt2img: image width in pixels (0 = the model's default size).
  sampling.dtype = 'float32'  # --mode=txt2img: weights and compute dtype, 'float32' | 'bfloat16' (sampling integrates in float32).
  sampling.variant = ''  # --mode=txt2img: weights file variant, e.g. 'fp16' for *.fp16.safetensors.

  # --- evaluation (--mode=eval) -----------------------------------------------------------------
  evaluation = config.eval = ml_collections.ConfigDict()
  evaluation.num_examples = 256  # test examples for bits/dim.
  evaluation.batch_size = 64  # examples per likelihood call.
  evaluation.num_draws = 1  # dequantization / Hutchinson draws per example.
  evaluation.rtol = 1e-5  # PF-ODE relative tolerance.
  evaluation.atol = 1e-5  # PF-ODE absolute tolerance.
  # 'auto': 'uniform' for 8-bit images (folder, tfds, uint8 arrays), 'none' for the rest (the
  # 17-level digits, float arrays) | 'uniform' | 'none' (bits/dim of a continuous density).
  evaluation.dequantize = 'auto'
  evaluation.t_start = 0.0  # PF-ODE start time for likelihoods (0 = process.t_min; score_sde: 1e-5).

  # --- device mesh ------------------------------------------------------------------------------
  mesh = config.mesh = ml_collections.ConfigDict()
  mesh.data = -1  # data-parallel axis size (-1 = all devices not used by fsdp).
  mesh.fsdp = 1  # parameter-sharding axis size (1 = params replicated).
  mesh.fsdp_min_size = 2**14  # with fsdp > 1, arrays with fewer elements stay replicated.

  config.lock()
  return config
