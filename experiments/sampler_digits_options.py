"""Given option sets of one sampler on a trained digits model, against its 1000-step reference.

    python experiments/sampler_digits_options.py --workdir=runs/digits_seed2 --method=dpmpp_2m \
        --steps=16,20,30 --options='{"grid": "cosine", "lower_order_final": true}' \
        --options='{"grid": "cosine", "lower_order_final": false}'      # ~5 min on 2 CPUs

The model, x_T and reference are those of ``sampler_panel.py``'s digits entry (``Digits``: the
EMA params of a ``configs/digits.py`` workdir, UniPC-3 with 1000 steps on the log-SNR grid as the
reference, DPM-Solver++(3M) with 1000 steps printed as its check). Prints the RMS error over
samples and pixels (data in [-1, 1]) of each option set at each num_steps, with the NFE spent,
and the library's defaults (``sampling.sample(method=..., num_steps=...)``) beside them. Each
option set compiles the U-Net sampler anew (~3 s here); the reference takes most of the time.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sampler_panel  # pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  parser.add_argument('--workdir', required=True, help='a configs/digits.py run (its EMA params)')
  parser.add_argument('--method', required=True, help="a sampling method, e.g. 'dpmpp_2m'")
  parser.add_argument('--steps', required=True, help='num_steps, comma-separated')
  parser.add_argument('--options', action='append', default=[],
                      help='one option set as a JSON object; repeat for more')
  parser.add_argument('--batch', type=int, default=128, help='samples (sampler_panel: 128)')
  parser.add_argument('--heun-first-step-corrected', action='store_true',
                      help="heun's corrector on its first step too where the noise level ratio "
                      'allows it (Karras et al.\'s Algorithm 1 with only the ratio guard), '
                      'against which karras.corrected_steps was measured')
  args = parser.parse_args()
  if args.heun_first_step_corrected:
    from diffusion_jax.sampling import core, karras  # pylint: disable=import-outside-toplevel
    karras.corrected_steps = core.short_steps
  steps = [int(n) for n in args.steps.split(',')]
  try:
    option_sets = [json.loads(o) for o in args.options]
  except json.JSONDecodeError as e:
    parser.error(f'--options must be a JSON object, e.g. \'{{"grid": "cosine"}}\': {e}')
  if not all(isinstance(o, dict) for o in option_sets):
    parser.error('--options must be a JSON object, e.g. \'{"grid": "cosine"}\'')
  t0 = time.time()
  digits = sampler_panel.Digits(args.workdir, args.batch)
  print(f'## {args.method} on {args.workdir} (step {digits.step}), B = {args.batch}; reference: '
        f'unipc 1000 steps (log-SNR), dpmpp_3m 1000 steps differs by RMS {digits.check:.1e} '
        f'({time.time() - t0:.0f} s)\n')
  print('| options | ' + ' | '.join(f'{n} steps' for n in steps) + ' |')
  print('|---|' + '---|' * len(steps))
  for opts in [None] + option_sets:
    cells = []
    for n in steps:
      x0, nfe = digits.run(args.method, n, **(opts or {}))
      cells.append(f'{digits.error(x0):.4g} ({nfe} NFE)')
    name = 'defaults' if opts is None else json.dumps(opts, sort_keys=True)
    print(f'| {name} | ' + ' | '.join(cells) + ' |', flush=True)
  print(f'\n({time.time() - t0:.0f} s)')


if __name__ == '__main__':
  main()
