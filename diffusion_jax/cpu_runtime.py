"""Opt-in process settings that make training and sampling on a CPU host faster: ``configure()``.

Importing ``diffusion_jax`` changes nothing in the process; ``main`` calls ``configure()`` once,
right after ``jax.distributed`` starts and before any computation. In a notebook, call it before
the first JAX computation to run as fast as the command line does. It applies three settings,
each measured on the CIFAR-10 U-Net's training step (figures, dates and commands in
``docs/benchmarks.md``):

1. ``XLA_FLAGS += --xla_cpu_experimental_ynn_fusion_type=reduce``: jaxlib 0.10 hands
   convolutions fused with their elementwise neighbours to YNNPACK, whose weight gradients are
   slower than XLA's own (Eigen) convolutions, while its reductions are faster; the flag keeps
   only the reductions on YNNPACK. XLA reads ``XLA_FLAGS`` once, when the first backend starts,
   and aborts on a flag it does not know, so the flag is added only before the backends start,
   only for the jaxlib versions it was measured on (``TESTED_JAXLIB``), and only if the user's
   ``XLA_FLAGS`` does not set it already.
2. ``jax_cpu_enable_async_dispatch=False``: the calling thread runs single-device computations,
   so the step's large temporary buffer comes from glibc's main arena (read when the CPU client
   is created: only before the backends start, and not if ``JAX_CPU_ENABLE_ASYNC_DISPATCH`` is
   set).
3. ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, -1)`` (glibc's mallopt(3)): that
   arena takes large blocks from the heap and never returns them, so the kernel does not map and
   zero the step's temporary buffer anew, one page fault at a time, every step. Only with glibc
   and the CPU as JAX's default backend (elsewhere the buffers are device memory).

The costs: resident memory no longer shrinks after its peak, and Python no longer runs ahead of
a single-device computation.

Opt-outs: ``DIFFUSION_JAX_CPU_RUNTIME=0`` leaves the process untouched;
``DIFFUSION_JAX_XLA_DEFAULTS=0`` leaves only ``XLA_FLAGS`` alone.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform

# jaxlib versions (prefixes) on which the XLA flags exist and were measured.
TESTED_JAXLIB = ('0.10.',)
XLA_CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=reduce',)

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def _backends_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  return bool(getattr(xla_bridge, '_backends', None))


def _missing_xla_flags() -> list[str]:
  """The flags of ``XLA_CPU_FLAGS`` that this jaxlib knows and the user's XLA_FLAGS lacks."""
  if os.environ.get('DIFFUSION_JAX_XLA_DEFAULTS', '1') == '0':
    return []
  try:
    jaxlib_version = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return []
  if not jaxlib_version.startswith(TESTED_JAXLIB):
    return []
  current = os.environ.get('XLA_FLAGS', '')
  return [f for f in XLA_CPU_FLAGS if f.split('=')[0] not in current]


def apply_xla_flags() -> list[str]:
  """Appends the measured CPU flags to ``XLA_FLAGS``; returns the flags added.

  Adds nothing once JAX's backends have started (XLA has read its flags then), under
  ``DIFFUSION_JAX_XLA_DEFAULTS=0``, on an untested jaxlib, or for a flag the user's
  ``XLA_FLAGS`` already sets. The user's own flags are kept, ahead of ours.
  """
  added = _missing_xla_flags()
  if not added or _backends_started():
    return []
  os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), *added]).strip()
  return added


def configure() -> list[str]:
  """Applies the settings above that still can be applied; returns a description of each.

  Call ``jax.distributed.initialize`` before this and any computation after it: the XLA flag and
  the dispatch setting only take before the backends start, and this function then starts them
  (to learn the default backend). A setting skipped because the backends had already started is
  reported as such in the returned list. Safe to call more than once.
  """
  if os.environ.get('DIFFUSION_JAX_CPU_RUNTIME', '1') == '0':
    return []
  import jax  # pylint: disable=import-outside-toplevel
  applied = []
  started = _backends_started()
  missing = _missing_xla_flags()
  if missing and started:
    applied.append(f'XLA_FLAGS {" ".join(missing)} not applied: JAX backends already started')
  elif missing:
    applied.extend(f'XLA_FLAGS {f}' for f in apply_xla_flags())
  if 'JAX_CPU_ENABLE_ASYNC_DISPATCH' not in os.environ and not started:
    jax.config.update('jax_cpu_enable_async_dispatch', False)
    applied.append('jax_cpu_enable_async_dispatch=False')
  on_cpu = jax.default_backend() == 'cpu'
  if on_cpu and platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc':
    libc = ctypes.CDLL(None)
    if libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1):
      applied.append('glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1')
  return applied
