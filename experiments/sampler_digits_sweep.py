"""No silent blow-up on trained models: every method's defaults at 1-100 steps against DDIM's.

    python experiments/sampler_digits_sweep.py --workdir=runs/digits_seed2 --workdir=runs/digits
        # ~15 min per model on 2 CPUs

Issue 22 asks that no method, with its defaults, return more than 2x DDIM's error at the same
NFE at any ``num_steps``, on the panel, a trained digits model included. ``sampler_panel.py
--phase=sweep`` checks the oracles; this checks trained models: for each ``--workdir`` (a
``configs/digits.py`` run, its EMA params), each deterministic method with only ``method`` and
``num_steps`` at every count of ``sampler_panel.SWEEP_STEPS``, its RMS error (over samples and
pixels, data in [-1, 1]) against the model's 1000-step reference (``sampler_panel.Digits``), over
DDIM's defaults at the NFE the run spent. Prints per model and method the worst ratio and where,
the cells over 2x, and each method's ratio at every step count.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sampler_panel  # pylint: disable=wrong-import-position


def sweep(digits, methods, steps):
  """{method: [(num_steps, nfe, error, ddim error)]} of the defaults on ``digits``."""
  ddim, out = {}, {}
  for m in methods:
    for n in steps:
      x0, nfe = digits.run(m, n)
      if nfe not in ddim:
        ddim[nfe] = digits.error(digits.run('ddim', nfe)[0])
      out.setdefault(m, []).append((n, nfe, digits.error(x0), ddim[nfe]))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  parser.add_argument('--workdir', action='append', required=True,
                      help='a configs/digits.py run (its EMA params); repeat for more')
  parser.add_argument('--methods', default=','.join(sampler_panel.OURS[1:]),
                      help='comma-separated (default: every deterministic method but DDIM)')
  parser.add_argument('--steps', default=None,
                      help='num_steps, comma-separated (default: sampler_panel.SWEEP_STEPS)')
  parser.add_argument('--batch', type=int, default=128, help='samples (sampler_panel: 128)')
  args = parser.parse_args()
  methods = args.methods.split(',')
  unknown = sorted(set(methods) - set(sampler_panel.OURS))
  if unknown:
    parser.error(f'--methods: unknown {unknown}; choose from {", ".join(sampler_panel.OURS)}')
  steps = (tuple(int(n) for n in args.steps.split(',')) if args.steps
           else sampler_panel.SWEEP_STEPS)
  t0 = time.time()
  results = {}
  for workdir in args.workdir:
    digits = sampler_panel.Digits(workdir, args.batch)
    print(f'# {workdir} (step {digits.step}): reference ready at {time.time() - t0:.0f} s '
          f'(dpmpp_3m 1000 steps differs by RMS {digits.check:.1e})', flush=True)
    results[workdir] = sweep(digits, methods, steps)
    print(f'# {workdir} done at {time.time() - t0:.0f} s', flush=True)
  print(f'\n## defaults at num_steps {steps[0]}-{steps[-1]} ({len(steps)} counts), RMS error / '
        f"DDIM's (defaults) at the NFE spent; B = {args.batch}\n")
  print('| model | method | worst ratio | at (num_steps, NFE, error, DDIM\'s) | cells > 2x |')
  print('|---|---|---|---|---|')
  for workdir, res in results.items():
    for m, cells in res.items():
      n, nfe, e, d = max(cells, key=lambda c: c[2] / c[3])
      over = sum(not c[2] <= 2.0 * c[3] for c in cells)
      print(f'| {workdir} | {m} | {e / d:.2f} | {n}, {nfe}, {e:.4g}, {d:.4g} | '
            f'{over} of {len(cells)} |')
  print('\nratio per num_steps:\n')
  print('| model | method | ' + ' | '.join(str(n) for n in steps) + ' |')
  print('|---|---|' + '---|' * len(steps))
  for workdir, res in results.items():
    for m, cells in res.items():
      print(f'| {workdir} | {m} | ' + ' | '.join(f'{e / d:.2f}' for _, _, e, d in cells) + ' |')
  print(f'\n({time.time() - t0:.0f} s)')


if __name__ == '__main__':
  main()
