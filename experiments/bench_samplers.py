"""Sampler accuracy and speed on the exact Gaussian-mixture oracle, against diffusers' schedulers.

    python experiments/bench_samplers.py                  # ~3 min (pinned to one CPU)
    python experiments/bench_samplers.py --quick          # fewer grids, no timing
    python experiments/bench_samplers.py --flax-python=/tmp/dfx/bin/python   # diffusers Flax peer

Every sampler starts from the same x_T under ``DiscreteVP.linear()`` with the exact eps-prediction
of ``oracles.example_mixture()``; the error is the RMS distance to the exact probability-flow map
``pf_ode_map`` (SciPy, float64), so it is pure discretization error. NFE counts model evaluations
per sample (ours: Heun 2 per step but 1 for the first and last; diffusers' Heun 2 per step less
one; PLMS and PNDM: one extra for the Heun warm start; none
for iPNDM; one fewer than steps for iPNDM with ``analytic_first_step``, whose first step uses a
closed form instead of the model, AMED's AFS: ``tests/test_sampling.py`` counts the calls).

Peers, each at its best setting (every ``timestep_spacing``, Karras sigmas where offered,
``clip_sample``/thresholding off, ``lower_order_final`` on and off): the PyTorch schedulers of
diffusers (DDIM, PNDM, DPMSolverMultistep 2M/3M, UniPC, DEIS, Euler, Heun, LMS) when torch and
diffusers are installed, and the Flax schedulers of diffusers 0.39 (their last release with Flax)
under ``jax.jit`` + ``lax.fori_loop`` for the speed comparison, which runs ours and them in one
process of the interpreter given by ``--flax-python``. Missing peers print 'not installed'.

The JAX model here is the oracle's formula with the 2 x 2 inverses written out (checked against
``GaussianMixture.model_fn`` at startup): the same function, a fraction of the compile time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

NFES = (5, 10, 20, 50)
# Timed runs per configuration (median): one run is 0.05-0.5 ms here, so few runs are noise.
# They are split into blocks alternating with the peer's, as are the compilations.
_WALL_REPEATS = 600
_WALL_BLOCKS = 10
_COMPILE_ROUNDS = 5
SPACINGS = ('linspace', 'leading', 'trailing')


# --- the oracle as a closed-form JAX function (also run by the Flax peer's interpreter) ---------


def mixture_eps_2d(weights, means, covs):
  """``eps(x, alpha, sigma)``: E[eps | x_t] of a 2-D Gaussian mixture; x: [B, 2], alpha: [B]."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  logw = jnp.log(jnp.asarray(weights, jnp.float32))
  mu = jnp.asarray(means, jnp.float32)  # [K, 2]
  c = jnp.asarray(covs, jnp.float32)  # [K, 2, 2]

  def eps(x, alpha, sigma):
    a2, s2 = (alpha**2)[:, None], (sigma**2)[:, None]
    p = a2 * c[None, :, 0, 0] + s2  # [B, K], the noised covariances' entries
    q = a2 * c[None, :, 0, 1]
    r = a2 * c[None, :, 1, 1] + s2
    det = p * r - q * q
    d0 = x[:, None, 0] - alpha[:, None] * mu[None, :, 0]
    d1 = x[:, None, 1] - alpha[:, None] * mu[None, :, 1]
    sol0 = (r * d0 - q * d1) / det
    sol1 = (p * d1 - q * d0) / det
    logp = logw - 0.5 * (jnp.log(det) + d0 * sol0 + d1 * sol1)
    resp = jax.nn.softmax(logp, axis=-1)
    score = -jnp.stack([jnp.sum(resp * sol0, -1), jnp.sum(resp * sol1, -1)], -1)
    return -sigma[:, None] * score

  return eps


def oracle_model(eps_fn, process):
  """``model(x, t, cond=None)``: the eps-prediction at our process's time t (alpha, sigma from
  ``process``); the oracle is unconditional, cond is ignored."""

  def model(x, t, cond=None):
    del cond
    return eps_fn(x, process.alpha(t), process.sigma(t))

  return model


def _compile(fn, x):
  """``(compiled, seconds)``: a fresh trace + lower + compile of ``jax.jit(fn)`` (no cache hit).

  Callers keep the minimum over several calls: the first compilation of a process also pays
  one-time costs.
  """
  import jax  # pylint: disable=import-outside-toplevel
  wrapped = lambda x: fn(x)  # pylint: disable=unnecessary-lambda  # a new function: no cache hit
  t0 = time.perf_counter()
  compiled = jax.jit(wrapped).lower(x).compile()
  return compiled, time.perf_counter() - t0


# --- speed: ours and the diffusers Flax peer, timed in one interpreter ----------------------------


SPEED_METHODS = ('ddim', 'dpmpp_2m')


def speed_main(path: str) -> None:
  """Times ours and diffusers' Flax DDIM / DPM-Solver++(2M) in this one process; prints JSON.

  Runs in the interpreter given by ``--flax-python`` (diffusers 0.39 with jax and flax; this
  repository's package is imported from its source tree), or in this one, timing ours alone,
  when there is none. Both sides share one process, and with it the model function, the XLA
  flags, the allocator and the thread pool: timed in two processes (as this script did
  before), the wall ratio of the same two DDIM programs at 5 NFE ranged 0.96-1.08 over three
  runs, while in one process it measured 0.973-0.980 over six.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from diffusion_jax import processes, sampling  # pylint: disable=import-outside-toplevel
  try:
    import diffusers  # pylint: disable=import-outside-toplevel
  except ImportError:
    diffusers = None
  data = np.load(path)
  eps_fn = mixture_eps_2d(data['weights'], data['means'], data['covs'])
  x_T = jnp.asarray(data['x_T'])
  process = processes.DiscreteVP.linear()
  model = oracle_model(eps_fn, process)
  peer_classes = {}
  if diffusers is not None and hasattr(diffusers, 'FlaxDDIMScheduler'):
    peer_classes = {'ddim': (diffusers.FlaxDDIMScheduler,
                             {'set_alpha_to_one': True, 'clip_sample': False}),
                    'dpmpp_2m': (diffusers.FlaxDPMSolverMultistepScheduler, {'solver_order': 2})}
  out = {'jax': jax.__version__, 'diffusers': diffusers.__version__ if peer_classes else None,
         'results': []}
  for method in SPEED_METHODS:
    for nfe in NFES:
      def ours(x, n=steps_for_nfe(method, nfe), method=method):
        return sampling.sample(model, process, method=method, num_steps=n, x_T=x)

      peer = None
      if method in peer_classes:
        cls, kw = peer_classes[method]
        sched = cls(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                    beta_schedule='linear', **kw)
        state = sched.set_timesteps(sched.create_state(), nfe, x_T.shape)

        def peer(x, state=state, sched=sched, nfe=nfe):

          def body(i, carry):
            x, st = carry
            t = st.timesteps[i]
            e = model(x, jnp.full(x.shape[:1], t + 1.0))  # our t is diffusers' t + 1
            x, st = sched.step(st, e, t, x, return_dict=False)
            return x, st

          return jax.lax.fori_loop(0, nfe, body, (x, state))[0]

      times, compiled = time_pair(ours, peer, x_T)
      row = {'method': method, 'nfe': nfe, **times}
      if peer is not None:
        row['peer_x0'] = np.asarray(compiled['peer'](x_T)).tolist()
      out['results'].append(row)
  print(json.dumps(out), flush=True)


def time_pair(ours, peer, x) -> tuple[dict, dict]:
  """Compile and wall times (s) of ``ours`` and ``peer`` (or None), alternating between them.

  ``_COMPILE_ROUNDS`` fresh compilations each, alternating, minimum kept (the first compilation
  of a process pays one-time costs); then ``_WALL_BLOCKS`` alternating blocks of
  ``_WALL_REPEATS // _WALL_BLOCKS`` calls each, median kept (load drifts within a run).

  Returns:
    ``({'ours_compile', 'ours_wall', 'peer_compile', 'peer_wall'}, {'ours', 'peer'})``: the
    times (no peer entries without a peer) and the last compiled programs.
  """
  fns = {'ours': ours, 'peer': peer} if peer is not None else {'ours': ours}
  compiles = {k: [] for k in fns}
  compiled = {}
  for _ in range(_COMPILE_ROUNDS):
    for k, fn in fns.items():
      compiled[k], secs = _compile(fn, x)
      compiles[k].append(secs)
  walls = {k: [] for k in fns}
  for _ in range(_WALL_BLOCKS):
    for k, c in compiled.items():
      walls[k] += _walls(c, x, max(_WALL_REPEATS // _WALL_BLOCKS, 1))
  out = {}
  for k in fns:
    out[f'{k}_compile'] = min(compiles[k])
    out[f'{k}_wall'] = float(np.median(walls[k]))
  return out, compiled


def _walls(compiled, x, repeats):
  """``repeats`` wall times (s) of a compiled function, after one untimed call."""
  compiled(x).block_until_ready()
  walls = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    compiled(x).block_until_ready()
    walls.append(time.perf_counter() - t0)
  return walls


def sample_errors(x0, ref) -> tuple[float, float]:
  """(RMS, median) of the per-sample distances to the exact map. At few NFE the RMS is set by
  the handful of samples near a boundary between modes that land in the other mode (errors ~1);
  the median shows how well the rest is integrated."""
  d = np.sqrt(np.sum((np.asarray(x0, np.float64) - ref)**2, -1))
  return float(np.sqrt(np.mean(d**2))), float(np.median(d))


# --- ours ---------------------------------------------------------------------------------------


def steps_for_nfe(method: str, nfe: int, opts=None) -> int:
  if method == 'heun':  # 2 n - 2 NFE: the first and the last step evaluate once
    return nfe // 2 + 1
  if method == 'plms' and (opts or {}).get('warm_start', 'heun') == 'heun':
    return max(nfe - 1, 1)
  if (opts or {}).get('analytic_first_step'):  # the first step evaluates no model
    return nfe + 1
  return nfe


def our_candidates(quick: bool):
  """(label, method, options) of every deterministic configuration measured."""
  # Uniform with 'linspace' or 'leading' starts or ends badly for us (they are diffusers'
  # conventions, tried for the peers): measured 2-10x worse than 'trailing' at 5-10 NFE. The other
  # grids run with their default 'linspace' ends and with 'trailing' ones.
  grids = [('uniform', 'trailing'), ('logsnr', None), ('karras', None), ('quadratic', None),
           ('logsnr', 'trailing'), ('karras', 'trailing'), ('quadratic', 'trailing')]
  if quick:
    grids = [('uniform', 'trailing'), ('quadratic', None), ('quadratic', 'trailing')]
  # iPNDM as its reference (the last step at the full order; the library's default below 5 steps
  # is a second-order last step, plms.LOWER_ORDER_FINAL_BELOW).
  ab = {'warm_start': 'ab', 'lower_order_final': False}
  methods = [('ddim', {}), ('plms', {}), ('plms', dict(ab, order=3)), ('plms', dict(ab, order=4)),
             ('plms', dict(ab, order=3, analytic_first_step=True)),
             ('plms', dict(ab, order=4, analytic_first_step=True)),
             ('heun', {}), ('dpmpp_2m', {}),
             ('dpmpp_3m', {}),
             ('unipc', {'order': 2, 'variant': 'bh2'}),
             ('unipc', {'order': 3, 'variant': 'bh1'})]
  for (method, opts), (grid, spacing) in itertools.product(methods, grids):
    o = dict(opts, grid=grid)
    if spacing:
      o['spacing'] = spacing
    label = method + ''.join(f' {k}={v}' for k, v in opts.items())
    yield label, method, o, grid + (f'/{spacing}' if spacing else '')


def run_ours(process, model, x_T, ref, quick):
  import jax  # pylint: disable=import-outside-toplevel
  from diffusion_jax import sampling  # pylint: disable=import-outside-toplevel
  rows = []
  for label, method, opts, grid in our_candidates(quick):
    errs = {}
    for nfe in NFES:
      n = steps_for_nfe(method, nfe, opts)
      try:
        fn = jax.jit(lambda x, n=n, method=method, opts=opts: sampling.sample(
            model, process, method=method, num_steps=n, x_T=x, return_info=True, **opts))
        x0, info = fn(x_T)
      except ValueError as e:  # e.g. order 3 with too few steps
        errs[nfe] = (None, None, str(e))
        continue
      errs[nfe] = (*sample_errors(x0, ref), info['nfe'])
    rows.append((label, grid, errs))
  return rows


# --- diffusers' PyTorch schedulers ---------------------------------------------------------------


def run_torch_peers(mix, x_T_np, ref):
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import diffusers  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None, None, 'not installed (pip install torch diffusers)'
  base = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule='linear')
  vp = {  # name -> (class, extra config variants)
      'DDIM': (diffusers.DDIMScheduler, [dict(clip_sample=False, set_alpha_to_one=True)]),
      'PNDM': (diffusers.PNDMScheduler, [dict(skip_prk_steps=True, set_alpha_to_one=True)]),
      'DPM++2M': (diffusers.DPMSolverMultistepScheduler,
                  [dict(solver_order=2, lower_order_final=l, use_karras_sigmas=k)
                   for l in (True, False) for k in (False, True)]),
      'DPM++3M': (diffusers.DPMSolverMultistepScheduler,
                  [dict(solver_order=3, lower_order_final=l, use_karras_sigmas=k)
                   for l in (True, False) for k in (False, True)]),
      'UniPC-bh2': (diffusers.UniPCMultistepScheduler,
                    [dict(solver_order=o, solver_type='bh2', lower_order_final=l)
                     for o in (2, 3) for l in (True, False)]),
      'UniPC-bh1': (diffusers.UniPCMultistepScheduler,
                    [dict(solver_order=o, solver_type='bh1', lower_order_final=l)
                     for o in (2, 3) for l in (True, False)]),
      'DEIS': (diffusers.DEISMultistepScheduler,
               [dict(solver_order=o, lower_order_final=l) for o in (2, 3) for l in (True, False)]),
      'Euler': (diffusers.EulerDiscreteScheduler,
                [dict(use_karras_sigmas=k) for k in (False, True)]),
      'Heun': (diffusers.HeunDiscreteScheduler, [dict(use_karras_sigmas=k) for k in (False, True)]),
      'LMS': (diffusers.LMSDiscreteScheduler, [dict(use_karras_sigmas=k) for k in (False, True)]),
  }
  results, medians = {}, {}
  for name, (cls, variants) in vp.items():
    best, best_med = {}, {}
    for variant, spacing in itertools.product(variants, SPACINGS):
      for nfe in NFES:
        try:
          err, med, calls = _torch_run(torch, cls, dict(base, timestep_spacing=spacing,
                                                        **variant), nfe, mix, x_T_np, ref)
        except Exception as e:  # pylint: disable=broad-except
          # A configuration a scheduler rejects (e.g. an order above the steps) is not a result.
          del e
          continue
        label = f'{spacing} {variant}'
        if np.isfinite(err) and (nfe not in best or err < best[nfe][0]):
          best[nfe] = (err, calls, label)
        if np.isfinite(med) and (nfe not in best_med or med < best_med[nfe][0]):
          best_med[nfe] = (med, calls, label)
    results[name] = best
    medians[name] = best_med
  return results, medians, diffusers.__version__


def _torch_run(torch, cls, config, nfe, mix, x_T_np, ref):
  """Runs one diffusers scheduler with the exact oracle; returns (RMS, median error, calls)."""
  from sampler_panel import diffusers_steps, drive_scheduler  # pylint: disable=import-outside-toplevel
  sched = cls(**config)
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))  # float64, as our process
  sched.set_timesteps(max(diffusers_steps(cls, nfe), 1))
  x = torch.tensor(x_T_np, dtype=torch.float32) * float(sched.init_noise_sigma)
  x0, calls = drive_scheduler(torch, sched, x, mix.eps_y_np, abar)
  return (*sample_errors(x0, ref), calls)


# --- main -----------------------------------------------------------------------------------------


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--speed-only', action='store_true', help='only the speed comparison')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--flax-python', default='/tmp/dfx/bin/python',
                      help='an interpreter with diffusers==0.39 (Flax schedulers), jax and flax')
  parser.add_argument('--pin-cpu', type=int, default=None,
                      help='CPU that the whole run and the speed worker are pinned to, for the '
                      'speed comparison (default: the first this process may use; -1: no pinning). '
                      'See _pin.')
  parser.add_argument('--speed-worker', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.speed_worker:
    speed_main(args.speed_worker)
    return
  if args.pin_cpu is None:
    args.pin_cpu = min(os.sched_getaffinity(0))
  if args.pin_cpu >= 0:
    _pin(args.pin_cpu)  # before JAX starts (the speed worker, started later, inherits it)

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from diffusion_jax import oracles, processes  # pylint: disable=import-outside-toplevel

  process = processes.DiscreteVP.linear()
  mix = oracles.example_mixture()
  x_T = jax.random.normal(jax.random.PRNGKey(0), (args.batch, 2), jnp.float32)
  x_T_np = np.asarray(x_T, np.float64)
  alpha_T, sigma_T = float(process.alpha(process.t_max)), float(process.sigma(process.t_max))
  ref = mix.pf_ode_map(x_T_np, alpha_T, sigma_T)
  model = oracle_model(mixture_eps_2d(mix.weights, mix.means, mix.covs), process)

  t_check = jnp.linspace(1.0, 1000.0, args.batch)
  gap = float(jnp.max(jnp.abs(model(x_T, t_check) - mix.model_fn(process)(x_T, t_check))))
  assert gap < 1e-4, f'closed-form oracle differs from GaussianMixture.model_fn by {gap}'

  if not args.speed_only:
    _accuracy(args, process, mix, model, x_T, x_T_np, ref)
  if args.quick:
    return
  _speed(args, mix, x_T_np, ref)


def _accuracy(args, process, mix, model, x_T, x_T_np, ref):
  print(f'# DiscreteVP.linear(), example_mixture(), B={args.batch}, RMS error vs pf_ode_map\n')
  t0 = time.perf_counter()
  ours = run_ours(process, model, x_T, ref, args.quick)
  print(f'## diffusion_jax ({time.perf_counter() - t0:.0f} s)\n')
  head = '| method | grid | ' + ' | '.join(f'NFE {n}' for n in NFES) + ' |'
  print(head + '\n|' + '---|' * (len(NFES) + 2))
  best_ours = {}  # (stat, nfe) -> (value, label); stat 0: RMS, 1: median
  for label, grid, errs in ours:
    cells = []
    for nfe in NFES:
      err, med, nfe_used = errs[nfe]
      if err is None:
        cells.append('—')
        continue
      cells.append(f'{err:.2e}' + ('' if nfe_used == nfe else f' ({nfe_used})'))
      for stat, value in enumerate((err, med)):
        if (stat, nfe) not in best_ours or value < best_ours[stat, nfe][0]:
          best_ours[stat, nfe] = (value, f'{label} [{grid}]')
    print(f'| {label} | {grid} | ' + ' | '.join(cells) + ' |')

  print('\n## diffusers (PyTorch), best setting per NFE\n')
  peers, peer_medians, version = run_torch_peers(mix, x_T_np, ref)
  if peers is None:
    print(version)
    return
  print(f'diffusers {version}\n')
  print('| scheduler | ' + ' | '.join(f'NFE {n}' for n in NFES) + ' |\n|'
        + '---|' * (len(NFES) + 1))
  best_peer = {}
  for name, best in peers.items():
    cells = []
    for nfe in NFES:
      if nfe not in best:
        cells.append('—')
        continue
      err, calls, _ = best[nfe]
      cells.append(f'{err:.2e}' + ('' if calls == nfe else f' ({calls})'))
    print(f'| {name} | ' + ' | '.join(cells) + ' |')
    for stat, table in enumerate((best, peer_medians[name])):
      for nfe, (value, _, setting) in table.items():
        if (stat, nfe) not in best_peer or value < best_peer[stat, nfe][0]:
          best_peer[stat, nfe] = (value, f'{name} [{setting}]')
  for stat, title in enumerate(('RMS error (target ratio <= 0.5)',
                                'median per-sample error (each side\'s best by this statistic)')):
    print(f'\n## ours vs diffusers: best {title}\n')
    print('| NFE | ours | best diffusers | ratio |\n|---|---|---|---|')
    for nfe in NFES:
      if (stat, nfe) in best_ours and (stat, nfe) in best_peer:
        (a, a_label), (b, b_label) = best_ours[stat, nfe], best_peer[stat, nfe]
        print(f'| {nfe} | {a:.2e} {a_label} | {b:.2e} {b_label} | {a / b:.3f} |')


def _pin(cpu: int) -> None:
  """Pins every thread of this process (and the children it starts later) to one CPU.

  Unpinned, the per-call time of one compiled sampler on this 2-vCPU machine is bimodal and
  switches within a process (DDIM, 10 steps: 69-79 or 116-119 us, on both sides): about 45 us per
  call of waking XLA's worker thread on the other CPU. Both sides on one CPU (``taskset``)
  measured 59-61 us, within 3% run to run. Called before JAX starts, which sizes its thread pool
  by the CPUs it may use (pinned after that, ours ran 5-25% slower than the peer's fresh process).
  Threads that already exist (NumPy's BLAS) are pinned by their ids.
  """
  for tid in os.listdir('/proc/self/task'):
    try:
      os.sched_setaffinity(int(tid), {cpu})
    except OSError:  # a thread that has exited
      pass


def _speed(args, mix, x_T_np, ref):
  cpu = args.pin_cpu
  pinned = f'pinned to CPU {cpu}' if cpu >= 0 else 'not pinned'
  print(f'\n## speed, B={args.batch}, CPU (jit; ours and the peer in one process, {pinned}; '
        f'alternating: {_COMPILE_ROUNDS} compilations each, min; {_WALL_REPEATS} runs each in '
        f'{_WALL_BLOCKS} blocks, median)\n')
  python = args.flax_python
  if not python or not os.path.exists(python):
    print('diffusers Flax: not installed (python -m venv /tmp/dfx && '
          '/tmp/dfx/bin/pip install diffusers==0.39.0 jax flax); timing ours alone\n')
    python = sys.executable
  timing = _run_speed(python, mix, x_T_np)
  if isinstance(timing, str) and python != sys.executable:  # the Flax interpreter failed
    print(f'diffusers Flax: {timing}; timing ours alone\n')
    timing = _run_speed(sys.executable, mix, x_T_np)
  if isinstance(timing, str):
    raise RuntimeError(f'timing failed: {timing}')
  import jax  # pylint: disable=import-outside-toplevel
  if timing['jax'] != jax.__version__:
    print(f"Note: timed under jax {timing['jax']} (the Flax interpreter's), this one has "
          f'{jax.__version__}.\n')
  if timing['diffusers']:
    print(f"diffusers Flax {timing['diffusers']} (lax.fori_loop over scheduler.step), "
          f"jax {timing['jax']}\n")
  print('| method | NFE | compile s | wall ms | Flax compile s | Flax wall ms | compile ratio | '
        'wall ratio | Flax RMS err |\n|' + '---|' * 9)
  for r in timing['results']:
    head = f"| {r['method']} | {r['nfe']} | {r['ours_compile']:.2f} | {1e3 * r['ours_wall']:.3f} |"
    if 'peer_wall' in r:
      print(head + f" {r['peer_compile']:.2f} | {1e3 * r['peer_wall']:.3f} | "
            f"{r['ours_compile'] / r['peer_compile']:.2f} | "
            f"{r['ours_wall'] / r['peer_wall']:.2f} | {sample_errors(r['peer_x0'], ref)[0]:.2e} |")
    else:
      print(head + ' — |' * 5)


def _run_speed(python, mix, x_T_np):
  """``speed_main``'s JSON from a run in ``python``, or a string saying why it failed."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'oracle.npz')
    np.savez(path, weights=mix.weights, means=mix.means, covs=mix.covs,
             x_T=x_T_np.astype(np.float32))
    proc = subprocess.run([python, os.path.abspath(__file__), '--speed-worker', path],
                          capture_output=True, text=True, check=False,
                          env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'})
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    tail = proc.stderr.strip().splitlines()[-1:] or ['?']
    return f'failed with exit code {proc.returncode} ({tail[0]})'
  return json.loads(lines[-1])


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
