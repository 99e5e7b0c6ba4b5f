"""Process settings that make training and sampling on a CPU host faster: ``configure()``.

A jitted training step of the DDPM CIFAR-10 U-Net needs one 1,072 MiB temporary buffer at batch 16
(XLA's ``memory_analysis().temp_size_in_bytes``). By default JAX runs a CPU computation on one of
its own threads, and glibc serves a request that large from a thread's arena with a fresh ``mmap``
that ``free`` unmaps again; so every step the kernel maps and zeroes the buffer anew, one 4 KiB page
fault at a time: 277,000 minor faults and 0.45 s of system time per 1.9 s step on this repository's
2-core CPU (``getrusage`` around each step; ``strace`` shows the munmap/mmap pair per step).

``configure()`` makes the calling thread run the computation (JAX's
``jax_cpu_enable_async_dispatch=False``, which applies to single-device computations) and tells
glibc's allocator, whose main arena then serves the buffer, to take large blocks from the heap
rather than from ``mmap`` and never to return freed memory to the kernel
(``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, -1)``; glibc's malloc(3) and
mallopt(3)). Neither setting alone removes the faults (276,600 and 274,500 per step); together
they leave none, and the batch-16 step went from 1.95-2.13 s to 1.68-1.77 s in alternating runs
of one script, the trainer's (``diffusion_jax.main`` on that network, 40 steps) from 0.50-0.52
to 0.60 steps/s.
``experiments/bench_train.py`` reports the current figure beside PyTorch's, whose step takes about
1,000 faults and the same time with or without the allocator settings. The digits job gains too
(1,000 steps: 17.4 M faults and 31-32 s of system time without, 0.4 M and 3 s with; 14.1-14.3
steps/s without, 14.8-16.1 with).

The costs: the process's resident memory no longer shrinks after its peak (peak RSS 3.79 vs 3.58 GB
in the 40-step trainer run above), and Python no longer runs ahead of a single-device computation
(the next batch is read while nothing runs), which the digits job's figures above already include.

Both settings are process-wide, and the dispatch setting only takes if it comes before JAX starts
its CPU backend: ``main`` applies them right after ``jax.distributed`` starts, before any
computation; in a notebook, call ``configure()`` before the first JAX computation to run
``train.train_and_evaluate`` as fast as the command line does. Set ``DIFFUSION_JAX_CPU_RUNTIME=0``
to leave the process untouched.
"""

from __future__ import annotations

import ctypes
import os
import platform

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def _backends_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  return bool(getattr(xla_bridge, '_backends', None))


def configure() -> list[str]:
  """Applies the settings above that still can be applied; returns a description of each.

  Inline dispatch is set only if JAX's backends have not started yet (it is read when the CPU
  client is created) and the user has not set ``JAX_CPU_ENABLE_ASYNC_DISPATCH``. Then the backends
  start (call ``jax.distributed.initialize`` before this), and the allocator settings are applied
  only where they help: glibc, and the CPU as JAX's default backend (on a GPU or TPU host the
  step's buffers are device memory, and host memory would be kept for nothing). Safe to call more
  than once.
  """
  if os.environ.get('DIFFUSION_JAX_CPU_RUNTIME', '1') == '0':
    return []
  import jax  # pylint: disable=import-outside-toplevel
  applied = []
  if 'JAX_CPU_ENABLE_ASYNC_DISPATCH' not in os.environ and not _backends_started():
    jax.config.update('jax_cpu_enable_async_dispatch', False)
    applied.append('jax_cpu_enable_async_dispatch=False')
  on_cpu = jax.default_backend() == 'cpu'
  if on_cpu and platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc':
    libc = ctypes.CDLL(None)
    if libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1):
      applied.append('glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1')
  return applied
