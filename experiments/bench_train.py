r"""Training-step benchmark of the DDPM CIFAR-10 U-Net against diffusers' PyTorch UNet2DModel.

Times, in one run and interleaved, the training step of our ``UNet()`` (Ho et al. 2020's CIFAR-10
network, 35,746,307 parameters) and of diffusers' ``UNet2DModel`` configured as
google/ddpm-cifar10-32 (the same architecture and parameter count), on this machine's CPU, float32:

  python experiments/bench_train.py --batch_sizes=16,64 --steps=6,3

Both sides run the same step: DDPM eps-loss (uniform t, Gaussian noise, q_sample), forward and
backward with dropout 0.1 active, global-norm gradient clipping at 1.0, Adam (lr 2e-4) and an EMA
(0.9999) of the parameters. Ours is ``training.step.train_step`` on ``objectives.denoising``,
jitted exactly as ``training.loop`` does (state donated), in a process set up by
``cpu_runtime.configure()`` as ``main`` sets up its own; the torch step uses foreach Adam and
foreach EMA updates, its fastest plain form (glibc's mallopt settings of ``cpu_runtime`` do not
change its step time; figures in docs/benchmarks.md).

Each framework runs in its own worker subprocess (so that peak RSS is its own); the parent starts a
JAX and a torch worker per batch size, lets each warm up, then alternates blocks of timed steps
between them so that load from other processes hits both alike, pausing ``--settle_s`` before
each block. Reported per framework and batch:
median seconds per step, images/s, the ratio to torch, peak RSS during the timed steps (VmHWM reset
after warm-up) and over the whole process (including compilation), and the time to the first
step (JAX: trace + compile + first step; torch: first step). Also: the forward MACs per image
(counted from the jaxpr's convolutions and matmuls, and XLA's estimate), XLA's FLOPs per training
step and the achieved GFLOP/s, and the compile time of ``sampling.sample(method='ddim')`` at
10 vs 1000 steps (one ``lax.scan``, so the two should match), and a ceiling: the network's 3x3
convolution [B, 32, 32, 128] -> 128 alone, forward and forward + both gradients, in each worker.

``--model=tiny`` runs the same pipeline on a small U-Net, for a quick check of the script itself.
Without torch or diffusers installed the peer is reported as 'not installed'.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['16', '64'], 'Batch sizes to time.')
_STEPS = flags.DEFINE_list('steps', ['6', '3'],
                           'Timed steps per framework, one value for all batch sizes or one per '
                           'batch size.')
_BLOCKS = flags.DEFINE_integer('blocks', 0, 'Alternating JAX/torch blocks the timed steps are '
                               'split into (0: one step per block).')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed steps after the first step.')
_SETTLE = flags.DEFINE_float('settle_s', 1.0, 'Pause before each block (and each ceiling '
                             "measurement), so that the previous framework's worker threads have "
                             'stopped spinning.')
_MODEL = flags.DEFINE_enum('model', 'ddpm', ['ddpm', 'tiny'],
                           "'ddpm': the CIFAR-10 DDPM U-Net; 'tiny': a small one (script check).")
_TORCH_THREADS = flags.DEFINE_integer('torch_threads', 0,
                                      'torch.set_num_threads (0: the CPUs this process may use).')
_FRAMEWORKS = flags.DEFINE_list('frameworks', ['jax', 'torch'], 'Which sides to run.')
_SAMPLER_STEPS = flags.DEFINE_list('sampler_steps', ['10', '1000'],
                                   'DDIM step counts whose compile time is measured ([] to skip).')
_WORKER = flags.DEFINE_string('worker', '', 'Internal: run as a worker (jax, torch, sampler).')
_BATCH = flags.DEFINE_integer('batch', 16, 'Internal: the worker batch size.')

IMAGE_SIZE = 32
# (ch, ch_mult, num_res_blocks, attn_resolutions); 'ddpm' is UNet()'s defaults.
MODELS = {'ddpm': (128, (1, 2, 2, 2), 2, (16,)), 'tiny': (32, (1, 2), 1, (16,))}
DDPM_PARAMS = 35_746_307
LR, CLIP, EMA_DECAY, DROPOUT, NUM_TIMESTEPS = 2e-4, 1.0, 0.9999, 0.1, 1000
TAG = '@@bench '


def _cpus() -> int:
  return len(os.sched_getaffinity(0))


# --- memory ---------------------------------------------------------------------------------------


def _vm_hwm_mib() -> float:
  """This process's peak RSS (VmHWM) in MiB; resettable, unlike ru_maxrss."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024
  return float('nan')


def _reset_hwm() -> bool:
  """Returns freed heap to the OS, then resets VmHWM to the current RSS; False where not permitted.

  ``malloc_trim`` first, so that the peak of the timed steps does not count heap pages that
  compilation or model construction freed but glibc kept.
  """
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def _maxrss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- worker protocol: JSON lines tagged TAG on stdout; commands on stdin --------------------------


def _send(**msg) -> None:
  sys.stdout.write(TAG + json.dumps(msg) + '\n')
  sys.stdout.flush()


# The machine's ceiling: the network's most frequent convolution (3x3, 128 -> 128 channels at
# 32 x 32), forward alone and forward + both gradients, timed in each framework. A training step
# is mostly such convolutions, so its GFLOP/s cannot exceed these by much.
CEILING_CONV = (IMAGE_SIZE, 128, 128, 3)  # (H = W, C_in, C_out, kernel)
CEILING_REPEATS = 10


def _conv_flops(batch: int) -> float:
  hw, cin, cout, k = CEILING_CONV
  return 2.0 * batch * hw * hw * cin * cout * k * k


def _best_seconds(fn, sync, repeats: int = CEILING_REPEATS) -> float:
  sync(fn())
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    sync(fn())
    best = min(best, time.perf_counter() - t0)
  return best


def _serve(step, sync, ceiling=None) -> None:
  """Answers 'run N' (times N steps), 'ceiling' (the convolution GFLOP/s, see CEILING_CONV) and
  'stop' (reports memory) commands from the parent."""
  reset_ok = _reset_hwm()
  for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == 'ceiling':
      _send(**(ceiling() if ceiling else {}))
    elif cmd[0] == 'run':
      times, cpu = [], []
      for _ in range(int(cmd[1])):
        t0, c0 = time.perf_counter(), time.process_time()
        sync(step())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
      _send(times=times, cpu=cpu)
    elif cmd[0] == 'stop':
      _send(rss_steps_mib=_vm_hwm_mib() if reset_ok else None, rss_process_mib=_maxrss_mib())
      return


# --- JAX ------------------------------------------------------------------------------------------


def _jax_unet():
  from diffusion_jax.models import UNet  # pylint: disable=import-outside-toplevel
  ch, ch_mult, nrb, attn = MODELS[_MODEL.value]
  return UNet(ch=ch, ch_mult=ch_mult, num_res_blocks=nrb, attn_resolutions=attn, dropout=DROPOUT)


def _count_macs(jaxpr) -> int:
  """Multiply-accumulates of the convolutions and matmuls of a jaxpr (recursing into sub-jaxprs)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (lc, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in lc]))
    elif name == 'conv_general_dilated':
      rhs_spec = eqn.params['dimension_numbers'].rhs_spec
      rhs = eqn.invars[1].aval.shape
      per_out = rhs[rhs_spec[1]] * int(np.prod([rhs[d] for d in rhs_spec[2:]]))
      total += int(np.prod(eqn.outvars[0].aval.shape)) * per_out
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += _count_macs(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += _count_macs(sub)
  return total


def _cost(obj) -> dict:
  cost = obj.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  return cost or {}


def _worker_jax(batch: int) -> None:
  t_start = time.perf_counter()
  import functools  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  # pylint: disable-next=import-outside-toplevel
  from diffusion_jax import cpu_runtime, objectives, optim, processes
  from diffusion_jax.training import state as state_lib
  from diffusion_jax.training import step as step_lib

  runtime = cpu_runtime.configure()  # as diffusion_jax.main does, before JAX's backends start

  module = _jax_unet()
  x1 = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
  params = jax.jit(lambda k: module.init({'params': k}, x1, jnp.ones((1,)), train=False)['params'])(
      jax.random.PRNGKey(0))
  num_params = sum(x.size for x in jax.tree.leaves(params))

  # Forward MACs per image: counted from the jaxpr, and XLA's (unoptimized-HLO) estimate.
  def forward(p, x):
    return module.apply({'params': p}, x, jnp.full((1,), 500.0), train=False)
  fwd_macs = _count_macs(jax.make_jaxpr(forward)(params, x1).jaxpr)
  fwd_flops_xla = _cost(jax.jit(forward).lower(params, x1)).get('flops', float('nan'))

  def network_fn(p, x, c_noise, cond=None, *, train=False, rngs=None):
    return module.apply({'params': p}, x, c_noise, **(cond or {}), train=train, rngs=rngs)

  tx = optim.make_optimizer(name='adam', learning_rate=LR, grad_clip=CLIP)
  state = state_lib.TrainState.create(params=params, tx=tx)
  del params
  process = processes.DiscreteVP.linear(NUM_TIMESTEPS)
  loss_fn = objectives.denoising(network_fn=network_fn, process=process, parameterization='eps',
                                 noise_input='t')
  step_fn = jax.jit(functools.partial(step_lib.train_step, loss_fn=loss_fn, ema_decay=EMA_DECAY),
                    donate_argnums=(0,))
  batch_x = {'x': jax.random.normal(jax.random.PRNGKey(1), (batch, IMAGE_SIZE, IMAGE_SIZE, 3))}
  key = jax.random.PRNGKey(2)
  jax.block_until_ready((state, batch_x))
  setup_s = time.perf_counter() - t_start

  # Time to first step: trace + lower, compile, run once (the compiled object is what jit caches).
  t0 = time.perf_counter()
  lowered = step_fn.lower(state, batch_x, key)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  state, metrics = compiled(state, batch_x, key)
  jax.block_until_ready((state, metrics))
  t3 = time.perf_counter()
  cost = _cost(compiled)
  mem = compiled.memory_analysis()
  mem = {k: getattr(mem, f'{k}_size_in_bytes', None) / 2**20
         for k in ('argument', 'output', 'temp', 'generated_code')} if mem else {}

  holder = [state]

  def step():
    holder[0], m = compiled(holder[0], batch_x, key)
    return m['loss']

  for _ in range(_WARMUP.value):
    jax.block_until_ready(step())
  _send(ready=True, num_params=int(num_params), setup_s=setup_s, trace_lower_s=t1 - t0,
        compile_s=t2 - t1, first_run_s=t3 - t2, first_step_s=t3 - t0,
        loss=float(metrics['loss']), step_flops=cost.get('flops'),
        step_bytes=cost.get('bytes accessed'), memory_mib=mem, fwd_macs=fwd_macs,
        fwd_flops_xla=fwd_flops_xla,
        devices=str(jax.devices()), jax_version=jax.__version__,
        xla_flags=os.environ.get('XLA_FLAGS', ''), cpu_runtime=runtime)
  def ceiling():
    hw, cin, cout, k = CEILING_CONV
    x = jax.random.normal(jax.random.PRNGKey(3), (batch, hw, hw, cin))
    w = jax.random.normal(jax.random.PRNGKey(4), (k, k, cin, cout)) * 0.03

    def conv(x, w):
      return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    fwd = jax.jit(conv)
    def fwd_and_grads(x, w):  # the cotangent is the output itself: nothing else is computed
      y, vjp = jax.vjp(conv, x, w)
      return vjp(y)

    fwd_bwd = jax.jit(fwd_and_grads)
    flops, sync = _conv_flops(batch), jax.block_until_ready
    return {'conv_fwd_gflops': flops / _best_seconds(lambda: fwd(x, w), sync) / 1e9,
            'conv_fwd_bwd_gflops': 3 * flops / _best_seconds(lambda: fwd_bwd(x, w), sync) / 1e9}

  _serve(step, jax.block_until_ready, ceiling)


def _worker_sampler(steps: list[int]) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  # pylint: disable-next=import-outside-toplevel
  from diffusion_jax import cpu_runtime, preconditioning, processes, sampling

  cpu_runtime.configure()

  module = _jax_unet()
  x1 = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
  params = jax.jit(lambda k: module.init({'params': k}, x1, jnp.ones((1,)), train=False)['params'])(
      jax.random.PRNGKey(0))
  process = processes.DiscreteVP.linear(NUM_TIMESTEPS)

  def network_fn(p, x, c_noise, cond=None, *, train=False, rngs=None):
    return module.apply({'params': p}, x, c_noise, **(cond or {}), train=train, rngs=rngs)

  results = {}
  for n in steps:
    # Params are an argument, not a closed-over constant, so they are not baked into the HLO.
    def sample_fn(p, x_T, n=n):
      model_fn = preconditioning.make_model_fn(network_fn, p, process)
      return sampling.sample(model_fn, process, method='ddim', num_steps=n, x_T=x_T)
    t0 = time.perf_counter()
    lowered = jax.jit(sample_fn).lower(params, x1)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    results[str(n)] = {'lower_s': t1 - t0, 'compile_s': t2 - t1}
  _send(sampler=results)


# --- PyTorch (diffusers) --------------------------------------------------------------------------


def _torch_unet():
  from diffusers import UNet2DModel  # pylint: disable=import-outside-toplevel
  ch, ch_mult, nrb, attn = MODELS[_MODEL.value]
  res = [IMAGE_SIZE // 2**i for i in range(len(ch_mult))]
  down = ['AttnDownBlock2D' if r in attn else 'DownBlock2D' for r in res]
  up = ['AttnUpBlock2D' if r in attn else 'UpBlock2D' for r in reversed(res)]
  # google/ddpm-cifar10-32's config, plus DDPM's training dropout.
  return UNet2DModel(
      sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, center_input_sample=False,
      time_embedding_type='positional', freq_shift=1, flip_sin_to_cos=False,
      down_block_types=tuple(down), up_block_types=tuple(up),
      block_out_channels=tuple(ch * m for m in ch_mult), layers_per_block=nrb,
      mid_block_scale_factor=1, downsample_padding=0, act_fn='silu', attention_head_dim=None,
      norm_num_groups=min(32, ch), norm_eps=1e-6, dropout=DROPOUT)


def _worker_torch(batch: int) -> None:
  import torch  # pylint: disable=import-outside-toplevel
  import diffusers  # pylint: disable=import-outside-toplevel

  threads = _TORCH_THREADS.value or _cpus()
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = _torch_unet().train()  # dropout active
  params = [p for p in model.parameters() if p.requires_grad]
  num_params = sum(p.numel() for p in params)
  ema = [p.detach().clone() for p in params]
  opt = torch.optim.Adam(params, lr=LR, foreach=True)
  betas = torch.linspace(1e-4, 0.02, NUM_TIMESTEPS, dtype=torch.float64)
  acp = torch.cumprod(1 - betas, 0)
  sqrt_acp, sqrt_1macp = acp.sqrt().float(), (1 - acp).sqrt().float()
  x0 = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)

  def step():
    t = torch.randint(0, NUM_TIMESTEPS, (batch,))
    noise = torch.randn_like(x0)
    x_t = sqrt_acp[t].view(-1, 1, 1, 1) * x0 + sqrt_1macp[t].view(-1, 1, 1, 1) * noise
    loss = torch.nn.functional.mse_loss(model(x_t, t).sample, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    opt.step()
    with torch.no_grad():
      torch._foreach_mul_(ema, EMA_DECAY)  # pylint: disable=protected-access
      torch._foreach_add_(ema, params, alpha=1 - EMA_DECAY)  # pylint: disable=protected-access
    return loss

  t0 = time.perf_counter()
  loss = float(step())
  first = time.perf_counter() - t0
  for _ in range(_WARMUP.value):
    step()
  _send(ready=True, num_params=int(num_params), first_step_s=first, loss=loss, threads=threads,
        interop_threads=torch.get_num_interop_threads(), torch_version=torch.__version__,
        diffusers_version=diffusers.__version__,
        mkldnn=bool(torch.backends.mkldnn.is_available()))
  def ceiling():
    hw, cin, cout, k = CEILING_CONV
    x = torch.randn(batch, cin, hw, hw, requires_grad=True)
    w = (torch.randn(cout, cin, k, k) * 0.03).requires_grad_()

    def fwd():
      with torch.no_grad():
        return torch.nn.functional.conv2d(x, w, padding=k // 2)

    def fwd_bwd():
      y = torch.nn.functional.conv2d(x, w, padding=k // 2)
      return torch.autograd.grad(y, (x, w), y.detach())

    flops = _conv_flops(batch)
    return {'conv_fwd_gflops': flops / _best_seconds(fwd, lambda _: None) / 1e9,
            'conv_fwd_bwd_gflops': 3 * flops / _best_seconds(fwd_bwd, lambda _: None) / 1e9}

  _serve(step, lambda loss: loss.item(), ceiling)


# --- parent ---------------------------------------------------------------------------------------


class Worker:
  """A worker subprocess; its stderr goes to a log file, tagged stdout lines are its answers."""

  def __init__(self, kind: str, batch: int, log_dir: str):
    self.kind = kind
    self.log_path = os.path.join(log_dir, f'{kind}_{batch}.log')
    self._log = open(self.log_path, 'w')
    argv = [sys.executable, os.path.abspath(__file__), f'--worker={kind}', f'--batch={batch}',
            f'--model={_MODEL.value}', f'--warmup={_WARMUP.value}',
            f'--torch_threads={_TORCH_THREADS.value}',
            f'--sampler_steps={",".join(_SAMPLER_STEPS.value)}']
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
    self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self._log, text=True, env=env)

  def receive(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(TAG):
        return json.loads(line[len(TAG):])
      self._log.write(line)
    self.proc.wait()
    with open(self.log_path) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f'{self.kind} worker exited ({self.proc.returncode}):\n{tail}')

  def ask(self, command: str) -> dict:
    self.proc.stdin.write(command + '\n')
    self.proc.stdin.flush()
    return self.receive()

  def close(self) -> dict:
    result = self.ask('stop')
    self.proc.wait()
    self._log.close()
    return result


def _torch_available() -> str | None:
  """None when torch and diffusers import; else why not."""
  try:
    import diffusers  # pylint: disable=import-outside-toplevel,unused-import
    import torch  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    return f'not installed ({e.name})'
  return None


def _loadavg() -> str:
  return ' '.join(f'{x:.2f}' for x in os.getloadavg())


def _bench_batch(batch: int, steps: int, frameworks: list[str], log_dir: str) -> dict:
  print(f'\n== batch {batch}: {steps} timed steps per framework (load {_loadavg()})', flush=True)
  workers, info = {}, {}
  for kind in frameworks:  # one at a time, so warm-ups do not overlap
    workers[kind] = Worker(kind, batch, log_dir)
    info[kind] = workers[kind].receive()
    print(f'   {kind} ready: {json.dumps(info[kind])}', flush=True)
  blocks = _BLOCKS.value or steps
  per_block = [steps // blocks + (i < steps % blocks) for i in range(blocks)]
  times = {kind: [] for kind in frameworks}
  cpu = {kind: [] for kind in frameworks}
  loads = [os.getloadavg()[0]]
  for i, n in enumerate(per_block):
    order = frameworks if i % 2 == 0 else frameworks[::-1]  # ABBA: neither always goes first
    for kind in order:
      time.sleep(_SETTLE.value)
      answer = workers[kind].ask(f'run {n}')
      times[kind] += answer['times']
      cpu[kind] += answer['cpu']
    loads.append(os.getloadavg()[0])
    print(f'   block {i + 1}/{blocks}: ' + ', '.join(
        f'{k} {", ".join(f"{t:.2f}" for t in times[k][-n:])} s' for k in frameworks)
        + f' (load {loads[-1]:.2f})', flush=True)
  for kind in frameworks:
    time.sleep(_SETTLE.value)
    info[kind].update(workers[kind].ask('ceiling'))
  for kind in frameworks:
    info[kind].update(workers[kind].close(), times=times[kind], cpu=cpu[kind])
  info['loads'] = loads
  return info


def _fmt(x, spec='.2f') -> str:
  return 'n/a' if x is None else format(x, spec)


def main(argv) -> None:
  del argv
  if _WORKER.value == 'jax':
    return _worker_jax(_BATCH.value)
  if _WORKER.value == 'torch':
    return _worker_torch(_BATCH.value)
  if _WORKER.value == 'sampler':
    return _worker_sampler([int(n) for n in _SAMPLER_STEPS.value])

  batch_sizes = [int(b) for b in _BATCH_SIZES.value]
  steps = [int(s) for s in _STEPS.value]
  if len(steps) == 1:
    steps = steps * len(batch_sizes)
  if len(steps) != len(batch_sizes):
    raise app.UsageError('--steps needs one value, or one per --batch_sizes entry.')
  frameworks = [f for f in _FRAMEWORKS.value if f in ('jax', 'torch')]
  torch_missing = _torch_available() if 'torch' in frameworks else None
  if torch_missing:
    frameworks.remove('torch')
  log_dir = os.path.join('/tmp', f'bench_train_{os.getpid()}')
  os.makedirs(log_dir, exist_ok=True)

  print(f'bench_train: model={_MODEL.value}, batch sizes {batch_sizes}, timed steps {steps}, '
        f'CPUs available {_cpus()} (os.cpu_count {os.cpu_count()}), '
        f'OPENBLAS_CORETYPE={os.environ.get("OPENBLAS_CORETYPE")!r}, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS")!r}, load {_loadavg()}; worker logs in {log_dir}',
        flush=True)
  t_run = time.perf_counter()
  results = {b: _bench_batch(b, s, frameworks, log_dir) for b, s in zip(batch_sizes, steps)}
  sampler = None
  if _SAMPLER_STEPS.value and 'jax' in frameworks:
    print(f'\n== sampler compile (load {_loadavg()})', flush=True)
    w = Worker('sampler', 1, log_dir)
    sampler = w.receive()['sampler']
    w.proc.wait()

  # --- report ---
  first = results[batch_sizes[0]]
  print('\n## Results\n')
  if 'jax' in first:
    j = first['jax']
    print(f'jax {j["jax_version"]} on {j["devices"]}: {j["num_params"]:,} parameters'
          + (' (= DDPM CIFAR-10)' if j['num_params'] == DDPM_PARAMS else ''))
    print(f'XLA_FLAGS of the JAX worker: {j.get("xla_flags") or "(none)"}; '
          f'diffusion_jax.cpu_runtime: {", ".join(j.get("cpu_runtime") or []) or "(off)"}')
  if 'torch' in first:
    t = first['torch']
    print(f'torch {t["torch_version"]} + diffusers {t["diffusers_version"]} UNet2DModel: '
          f'{t["num_params"]:,} parameters; torch.set_num_threads({t["threads"]}), '
          f'interop threads {t["interop_threads"]}, mkldnn {t["mkldnn"]}')
    if 'jax' in first:
      same = t['num_params'] == first['jax']['num_params']
      print(f'parameter counts {"equal" if same else "DIFFER"}')
  else:
    print(f'torch/diffusers peer: {torch_missing or "not run"}')
  print()
  print('| framework | batch | median s/step | img/s | ratio vs torch (img/s) | '
        'peak RSS steps MiB | peak RSS process MiB | time to first step s |')
  print('|---|---|---|---|---|---|---|---|')
  for b in batch_sizes:
    r = results[b]
    med = {k: statistics.median(r[k]['times']) for k in frameworks}
    for k in frameworks:
      ratio = (med['torch'] / med[k]) if 'torch' in med else None
      print(f'| {k} | {b} | {med[k]:.3f} | {b / med[k]:.2f} | {_fmt(ratio)} | '
            f'{_fmt(r[k]["rss_steps_mib"], ".0f")} | {r[k]["rss_process_mib"]:.0f} | '
            f'{r[k]["first_step_s"]:.1f} |')
    if torch_missing:
      print(f'| torch | {b} | {torch_missing} | | | | | |')
  print()
  for b in batch_sizes:
    r = results[b]
    line = f'batch {b}: load average during the timed blocks ' + ', '.join(
        f'{x:.1f}' for x in r['loads'])
    for k in frameworks:
      line += f'; {k} step times ' + ' '.join(f'{t:.2f}' for t in r[k]['times'])
      line += f' s (process CPU s/step, median {statistics.median(r[k]["cpu"]):.2f})'
    print(line)
  if 'jax' in first:
    j = first['jax']
    print(f'\nForward per image: {j["fwd_macs"] / 1e9:.3f} GMACs counted from the jaxpr '
          f'(convolutions + matmuls incl. attention); XLA estimate {j["fwd_flops_xla"] / 2e9:.3f} '
          'GMACs (its flops / 2, elementwise ops included).')
    for b in batch_sizes:
      r = results[b]
      j = r['jax']
      flops = j['step_flops']
      med_j = statistics.median(j['times'])
      line = (f'batch {b}: JAX time to first step {j["first_step_s"]:.1f} s = trace+lower '
              f'{j["trace_lower_s"]:.1f} + compile {j["compile_s"]:.1f} + first run '
              f'{j["first_run_s"]:.1f}')
      if flops:
        line += (f'; XLA cost analysis {flops / 1e9:.1f} GFLOP per training step '
                 f'({flops / b / (2 * j["fwd_macs"]):.2f}x the forward FLOPs per image); '
                 f'achieved JAX {flops / med_j / 1e9:.1f} GFLOP/s')
        if 'torch' in r:
          line += f', torch {flops / statistics.median(r["torch"]["times"]) / 1e9:.1f} GFLOP/s'
          line += ' (same FLOP count)'
      print(line)
      hw, cin, cout, k = CEILING_CONV
      print(f'batch {b}: ceiling, the {k}x{k} convolution [{b}, {hw}, {hw}, {cin}] -> {cout} alone '
            '(best of 10), forward / forward + both gradients: ' + '; '.join(
                f'{kind} {r[kind]["conv_fwd_gflops"]:.0f} / {r[kind]["conv_fwd_bwd_gflops"]:.0f} '
                'GFLOP/s' for kind in frameworks if 'conv_fwd_gflops' in r[kind])
            + f'; the JAX step reaches {flops / med_j / 1e9 / r["jax"]["conv_fwd_bwd_gflops"]:.0%}'
            ' of the JAX forward + gradients rate')
      if j.get('memory_mib'):
        print(f'batch {b}: XLA buffers MiB: ' + ', '.join(
            f'{k} {v:.0f}' for k, v in j['memory_mib'].items()))
  if sampler:
    print('\nSampler (ddim, batch 1) jit: ' + '; '.join(
        f'{n} steps: trace+lower {v["lower_s"]:.2f} s, compile {v["compile_s"]:.2f} s'
        for n, v in sampler.items()))
  print(f'\nTotal wall time {time.perf_counter() - t_run:.0f} s; load average at the end '
        f'{_loadavg()}.')


if __name__ == '__main__':
  app.run(main)
