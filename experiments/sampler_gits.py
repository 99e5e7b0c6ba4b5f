"""GITS grids (``sampling/gits.py``) on the oracle panels of ``sampler_panel.py``, against diffusers.

    python experiments/sampler_gits.py --phase=choose   # cost options, choosing panel, 10 NFE
    python experiments/sampler_gits.py --phase=report   # held-out and target panels, 5-50 NFE
    python experiments/sampler_gits.py --phase=trained --digits-workdir=runs/digits  # a digits model

Per oracle (a Gaussian mixture under a process, exact eps), ``gits.calibrate`` runs on its own
calibration batch (``--calibration`` samples from other x_T than the evaluation's) and every
method runs on ``calibration.times(n)`` at the most steps whose NFE fits, from the evaluation
batch's x_T of ``sampler_panel.py --phase=report`` (same seeds), so the errors compare with that
report's: RMS against the exact probability-flow map. Per oracle the ratio to the best diffusers
scheduler (each at its best ``timestep_spacing``, as there); tables of the geometric mean and the
worst over the panel's mixtures, and the worst ratio to DDIM's error (the library's defaults) over
every oracle, the single Gaussians included. The calibration's NFE (``2 num_teacher_steps`` per
calibration sample) is not in the NFE: it is spent once per model.

- ``choose``: the cost options (metric, scale, coeff) x methods at 10 NFE on the CHOOSING panel.
- ``report``: ``gits.calibrate``'s defaults on the HELD-OUT and TARGET panels at 5 / 10 / 20 / 50
  NFE, with the best of the library's defaults (every method) beside them.
- ``trained``: the digits model of ``--digits-workdir`` (configs/digits.py) against the 1000-step
  reference of ``sampler_panel.py --phase=trained`` (same x_T), calibrated on
  ``--calibration`` samples from other x_T; ours with defaults and diffusers' schedulers beside.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sampler_panel as sp  # noqa: E402  pylint: disable=wrong-import-position

# name -> (method, options); every one spends num_steps NFE on explicit times.
METHODS = {
    'ipndm3': ('plms', {'order': 3, 'warm_start': 'ab'}),
    'ipndm4': ('plms', {'order': 4, 'warm_start': 'ab'}),
    'unipc': ('unipc', {'order': 3, 'variant': 'bh2', 'lower_order_final': True}),
}
# (metric, scale, coeff) of the choice; the first is the paper's (l2 in EDM's state, coeff 1).
VARIANTS = (('l2', 'edm', 1.0), ('mse', 'edm', 1.0), ('l2', 'prior', 1.0),
            ('mse', 'prior', 1.0), ('l2', 'edm', 1.15), ('mse', 'prior', 1.15))


def oracle_model(process, o):
  """``model(x, t, cond) -> eps`` of one oracle, float32."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return sp.mixture_model(process, jnp.asarray(np.log(o.weights), jnp.float32),
                          jnp.asarray(o.means, jnp.float32), jnp.asarray(o.stds**2, jnp.float32))


def run_on_times(process, model, x_T, calibration, method, opts, nfe):
  """x_0 of ``method`` on the calibration's grid at the most steps whose NFE is at most nfe."""
  import jax  # pylint: disable=import-outside-toplevel
  from diffusion_jax import sampling  # pylint: disable=import-outside-toplevel

  def run(n):
    x0, info = jax.jit(lambda x: sampling.sample(
        model, process, method=method, num_steps=n, x_T=x, times=calibration.times(n),
        return_info=True, **opts))(x_T)
    return np.asarray(x0, np.float64), int(info['nfe'])

  fitted = sp.fit_steps(run, nfe)
  if fitted is None:
    raise ValueError(f'{method} fits no step count in {nfe} NFE')
  return fitted[0]


def evaluate(args, kind, variants, methods, nfes):
  """{(nfe, label): [ratio per oracle]} and the single-Gaussian mask."""
  import jax  # pylint: disable=import-outside-toplevel
  from diffusion_jax.sampling import gits  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  out, single = {}, []
  for pname, oracles in sp.panel(kind, args.per_process).items():
    process = sp.make_process(pname)
    b = sp.Batch(process, oracles, args.batch, seed=200)
    peers, ddim, ours = {}, {}, {}
    for nfe in nfes:
      p = sp.best_diffusers(b, nfe)
      peers[nfe] = np.stack([v[0] for v in p.values()]).min(0)
      errs = {m: sp.run_ours(b, m, nfe, None)[0] for m in sp.OURS}
      errs = {m: (e if e is not None else np.full(len(oracles), np.inf)) for m, e in errs.items()}
      ddim[nfe] = errs['ddim']
      ours[nfe] = np.stack(list(errs.values())).min(0)
    scale_T = float(np.sqrt(process.alpha(process.t_max)**2 + process.sigma(process.t_max)**2))
    for i, o in enumerate(oracles):
      single.append(sp.bound_only(pname))
      model = oracle_model(process, o)
      rows = slice(i * args.batch, (i + 1) * args.batch)
      x_T, ref = b.x_T[rows, :o.dim], b.ref[rows, :o.dim]
      x_cal = scale_T * jax.random.normal(jax.random.PRNGKey(999 + i), (args.calibration, o.dim))
      for nfe in nfes:
        out.setdefault((nfe, 'defaults (best of ours)'), []).append(ours[nfe][i] / peers[nfe][i])
        out.setdefault((nfe, 'ddim'), []).append(ddim[nfe][i] / peers[nfe][i])
      for metric, scale, coeff in variants:
        cal = gits.calibrate(model, process, x_T=x_cal, num_teacher_steps=args.teacher_steps,
                             metric=metric, scale=scale, coeff=coeff)
        for nfe in nfes:
          for name, (method, opts) in methods.items():
            x0 = run_on_times(process, model, x_T, cal, method, opts, nfe)
            err = float(np.sqrt(np.mean((x0 - ref)**2)))
            label = f'gits {metric}/{scale}/{coeff:g} + {name}'
            out.setdefault((nfe, label), []).append(err / peers[nfe][i])
    print(f'# {kind}/{pname} done at {time.time() - t0:.0f} s', flush=True)
  return out, np.array(single)


def table(out, single, nfes, title):
  mix = ~single
  print(f'\n### {title}\n')
  print('ratio to the best diffusers scheduler per oracle: geometric mean (worst) over the '
        f'{mix.sum()} mixtures; worst ratio to DDIM (defaults) over all {len(single)} oracles\n')
  labels = sorted({k[1] for k in out if k[1] != 'ddim'})
  print('| | ' + ' | '.join(f'NFE {n}' for n in nfes) + ' |\n|' + '---|' * (len(nfes) + 1))
  for label in labels:
    cells = []
    for nfe in nfes:
      r, d = np.array(out[(nfe, label)]), np.array(out[(nfe, 'ddim')])
      cells.append(f'{sp._gmean(r[mix]):.2f} ({r[mix].max():.1f}); {np.max(r / d):.2f}x DDIM')  # pylint: disable=protected-access
    print(f'| {label} | ' + ' | '.join(cells) + ' |')
  gits_labels = [x for x in labels if x.startswith('gits')]
  if gits_labels:
    cells = []
    for nfe in nfes:
      r = np.min(np.stack([np.array(out[(nfe, x)]) for x in gits_labels
                           + ['defaults (best of ours)']]), 0)
      cells.append(f'{sp._gmean(r[mix]):.2f} ({r[mix].max():.1f})')  # pylint: disable=protected-access
    print('| best of ours, GITS included | ' + ' | '.join(cells) + ' |')


def trained(args, nfes):
  """The fitted grid on a trained digits model; prints RMS errors and the ratios to diffusers."""
  import jax  # pylint: disable=import-outside-toplevel
  from diffusion_jax.sampling import gits  # pylint: disable=import-outside-toplevel
  digits = sp.Digits(args.digits_workdir, args.digits_batch)
  print(f'\n## trained digits model ({args.digits_workdir}, step {digits.step}), '
        f'B = {args.digits_batch}, calibration {args.calibration} samples\n')
  cal = gits.calibrate(digits.model_fn, digits.process, prediction=digits.prediction,
                       key=jax.random.PRNGKey(301),
                       shape=(args.calibration,) + tuple(digits.x_T.shape[1:]),
                       num_teacher_steps=args.teacher_steps)
  errs = sp.trained_errors(digits, nfes)
  for name, (method, opts) in METHODS.items():
    for nfe in nfes:
      x0, _ = sp.fit_steps(lambda n, method=method, opts=opts: digits.run(
          method, n, times=cal.times(n), **opts), nfe)
      errs[f'gits + {name}', nfe] = digits.error(x0)
  names = sorted({k for k, _ in errs}, key=lambda k: (k.split()[0] != 'ours', k))
  print('| | ' + ' | '.join(f'NFE {n}' for n in nfes) + ' |\n|' + '---|' * (len(nfes) + 1))
  for name in names:
    print(f'| {name} | ' + ' | '.join(f'{errs[name, n]:.3g}' if (name, n) in errs else '-'
                                      for n in nfes) + ' |')
  best = lambda nfe, pre: min(v for (k, n), v in errs.items()
                              if n == nfe and k.startswith(pre))
  for label, pre in (('best of ours (defaults)', ('ours',)), ('best of ours, GITS included',
                                                              ('ours', 'gits'))):
    print(f'| **{label} / best of diffusers** | ' + ' | '.join(
        f'{best(n, pre) / best(n, "diffusers"):.2f}' for n in nfes) + ' |')


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--phase', default='report', choices=('choose', 'report', 'trained'))
  p.add_argument('--digits-workdir', default='runs/digits', help='--phase=trained: a '
                 'configs/digits.py workdir')
  p.add_argument('--digits-batch', type=int, default=128)
  p.add_argument('--panels', default='heldout,target', help='the report phase\'s panels')
  p.add_argument('--batch', type=int, default=256, help='evaluation samples per oracle')
  p.add_argument('--per-process', type=int, default=6)
  p.add_argument('--calibration', type=int, default=64, help='calibration samples per oracle')
  p.add_argument('--teacher-steps', type=int, default=100)
  p.add_argument('--nfes', default=None, help='comma-separated NFEs (default: 10 for choose, '
                 '5,10,20,50 for report)')
  args = p.parse_args()
  t0 = time.time()
  if args.phase == 'choose':
    nfes = [int(n) for n in (args.nfes or '10').split(',')]
    out, single = evaluate(args, 'choose', VARIANTS, METHODS, nfes)
    table(out, single, nfes, 'choosing panel')
  elif args.phase == 'trained':
    trained(args, [int(n) for n in (args.nfes or '5,10,20,50').split(',')])
  else:
    nfes = [int(n) for n in (args.nfes or '5,10,20,50').split(',')]
    for kind in args.panels.split(','):
      out, single = evaluate(args, kind, [('mse', 'prior', 1.0)], METHODS, nfes)
      table(out, single, nfes, f'{kind} panel, gits.calibrate\'s defaults')
  print(f'\n({time.time() - t0:.0f} s)')


if __name__ == '__main__':
  main()
