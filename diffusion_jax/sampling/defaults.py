"""The options a fixed-step method takes when the caller gives only ``method`` and ``num_steps``.

Chosen on a panel of exact oracles (issue 22; ``experiments/sampler_panel.py``): Gaussian
mixtures in 2-64 dimensions, component stds 0.03-1, mean spreads 0.5-3, zero and non-zero means,
under the discrete linear and cosine schedules and the VE SDE, error = RMS distance to the exact
probability-flow map from the same x_T; plus a trained model (the digits job, seed 2) against a
1000-step reference, run on each method's three best option sets per band on the oracles; and
2 off-centre single Gaussians per process, which enter only the 2x-DDIM bound below (a single
Gaussian shows a method's error within a mode, which the mixtures' mode flips hide). For each
method and NFE band the option set (grid, spacing, order, lower_order_final, ...) is the one
with the smallest WORST-CASE ratio to the best of all methods and options on each mixture and
the digits model, over the band's NFEs (5, 7 / 8, 10, 14 / 16, 20, 30 / 40, 50), within 2x
DDIM's error at the NFE the run spends on every entry (else the closest to that bound); in the
last band only options that keep the method's convergence order. The 10-NFE band was chosen with
1024 samples per oracle, the others with 256: at 256 its worst case was set by one or two of the
256 samples of a 64-D mixture (stds 0.03-0.05) going to another mode (ratios of 100-240x). ``grid='optimized'``
(``grids.optimized``) was fitted on the same choosing panel at the 10-NFE band's step counts
(``experiments/sampler_grid_fit.py``), so its ratios there are optimistic, and is a candidate
at that band only. The tables in ``docs/benchmarks.md`` report the choice on a held-out panel
(other mixtures, two more schedules, another digits model) against diffusers.

Bands, by the NFE a run spends (``approx_nfe``: Heun's 2 n - 2, n for the others): up to 7 take
the options chosen at 5 NFE, up to 14 those at 10, up to 31 those at 20, more those at 50.
What the caller gives wins: a given ``grid`` keeps its own spacing unless ``spacing`` is given
too; explicit ``times`` replace the grid and spacing (the other options still apply, so a named
grid's own times give that grid's samples); with ``levels`` (another library's schedule step for
step) nothing is filled in. ``euler`` takes DDIM's choice (the same update when deterministic); the stochastic
methods (``ddpm``, ``dpmpp_2m_sde``, ``pc``) and ``ode`` keep their signatures' defaults.
"""

from __future__ import annotations

from typing import Any

# Upper NFE bounds of the bands of 5, 10 and 20 NFE (geometric midpoints); above: the 50 band.
BAND_LIMITS = (7, 14, 31)
BAND_NFES = (5, 10, 20, 50)

# method -> options per band (5, 10, 20, 50 NFE), from experiments/sampler_panel.py --phase=choose.
DEFAULTS: dict[str, tuple[dict[str, Any], ...]] = {
    'ddim': (
        {'grid': 'cosine', 'spacing': 'trailing'},  # 5 NFE
        {'grid': 'cosine', 'spacing': 'trailing'},  # 10 NFE
        {'grid': 'cosine', 'spacing': 'trailing'},  # 20 NFE
        {'grid': 'cosine', 'spacing': 'trailing'},  # 50 NFE
    ),
    'euler': (
        {'grid': 'cosine', 'spacing': 'trailing'},  # 5 NFE
        {'grid': 'cosine', 'spacing': 'trailing'},  # 10 NFE
        {'grid': 'cosine', 'spacing': 'trailing'},  # 20 NFE
        {'grid': 'cosine', 'spacing': 'trailing'},  # 50 NFE
    ),
    'heun': (
        {'grid': 'cosine', 'spacing': 'trailing'},  # 5 NFE
        {'grid': 'cosine', 'spacing': 'trailing'},  # 10 NFE
        {'grid': 'cosine', 'spacing': 'trailing'},  # 20 NFE
        {'grid': 'cosine', 'spacing': 'trailing'},  # 50 NFE
    ),
    'plms': (
        {'grid': 'cosine', 'spacing': 'trailing', 'order': 3, 'warm_start': 'ab'},  # 5 NFE
        {'grid': 'cosine', 'spacing': 'trailing', 'order': 4, 'warm_start': 'ab',
         'lower_order_final': True},  # 10 NFE
        {'grid': 'cosine', 'spacing': 'trailing', 'order': 4, 'warm_start': 'heun'},  # 20 NFE
        {'grid': 'cosine', 'spacing': 'trailing', 'order': 3, 'warm_start': 'ab'},  # 50 NFE
    ),
    'dpmpp_2m': (
        {'grid': 'cosine', 'spacing': 'trailing', 'lower_order_final': False},  # 5 NFE
        {'grid': 'cosine', 'spacing': 'trailing', 'lower_order_final': True},  # 10 NFE
        {'grid': 'cosine', 'spacing': 'trailing', 'lower_order_final': True},  # 20 NFE
        {'grid': 'cosine', 'spacing': 'trailing', 'lower_order_final': False},  # 50 NFE
    ),
    'dpmpp_3m': (
        {'grid': 'cosine', 'spacing': 'trailing', 'lower_order_final': False,
         'order': 3, 'reference_third_order': True},  # 5 NFE
        {'grid': 'cosine', 'spacing': 'trailing', 'lower_order_final': False,
         'order': 3, 'reference_third_order': False},  # 10 NFE
        {'grid': 'logsnr', 'spacing': 'trailing', 'lower_order_final': False,
         'order': 3, 'reference_third_order': True},  # 20 NFE
        {'grid': 'cosine', 'spacing': 'trailing', 'lower_order_final': False,
         'order': 3, 'reference_third_order': False},  # 50 NFE
    ),
    'unipc': (
        {'grid': 'cosine', 'spacing': 'trailing', 'lower_order_final': True,
         'order': 2, 'variant': 'bh2'},  # 5 NFE
        {'grid': 'optimized', 'spacing': 'trailing', 'lower_order_final': False,
         'order': 3, 'variant': 'bh2'},  # 10 NFE
        {'grid': 'cosine', 'spacing': 'trailing', 'lower_order_final': False,
         'order': 3, 'variant': 'bh2'},  # 20 NFE
        {'grid': 'cosine', 'spacing': 'trailing', 'lower_order_final': False,
         'order': 3, 'variant': 'bh2'},  # 50 NFE
    ),
}


def approx_nfe(method: str, num_steps: int) -> int:
  """The NFE a run of ``num_steps`` spends, for the band (Heun: two evaluations per step but
  one for the first and the last; its guard against long steps may spend fewer)."""
  return max(2 * num_steps - 2, num_steps) if method == 'heun' else num_steps


def band(method: str, num_steps: int, *, nfe: int | None = None) -> int:
  """The index into ``BAND_NFES`` of the band ``num_steps`` of ``method`` falls in; ``nfe``: the
  NFE the run spends when known (Heun's guard may spend fewer than ``approx_nfe``)."""
  nfe = approx_nfe(method, num_steps) if nfe is None else nfe
  for i, limit in enumerate(BAND_LIMITS):
    if nfe <= limit:
      return i
  return len(BAND_LIMITS)


def default_options(method: str, num_steps: int, *, nfe: int | None = None) -> dict[str, Any]:
  """The chosen options of ``method`` at ``num_steps`` (empty for methods without a choice);
  ``nfe``: the NFE the run spends, when known (``band``)."""
  if method not in DEFAULTS:
    return {}
  return dict(DEFAULTS[method][band(method, num_steps, nfe=nfe)])


def with_defaults(method: str, num_steps: int, options: dict[str, Any], *,
                  nfe: int | None = None) -> dict[str, Any]:
  """``options`` completed with the chosen defaults (the module docstring says which win);
  ``nfe``: the NFE the run spends, when known (``band``)."""
  if options.get('levels') is not None:
    return options
  out = dict(options)
  chosen = default_options(method, num_steps, nfe=nfe)
  if options.get('times') is not None:  # the grid itself: the other options still apply
    chosen = {k: v for k, v in chosen.items() if k not in ('grid', 'spacing')}
  grid_given = out.get('grid') is not None
  spacing_given = out.get('spacing') is not None
  for k, v in chosen.items():
    if k == 'grid':
      if not grid_given:
        out['grid'] = v
    elif k == 'spacing':
      if not grid_given and not spacing_given:
        out['spacing'] = v
    elif out.get(k) is None:
      out[k] = v
  return out
