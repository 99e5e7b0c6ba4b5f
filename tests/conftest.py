"""Shared test setup: the XLA CPU flag of ``main``, and a persistent compilation cache.

The session compiles with the XLA CPU flag that ``cpu_runtime.configure()`` gives the command
line (``cpu_runtime.apply_xla_flags()``, here before any test starts JAX's backends), so the
suite checks the programs users run; ``DIFFUSION_JAX_XLA_DEFAULTS=0`` runs it without. Only the
flag: the dispatch and allocator settings of ``configure()`` are process-wide and tested in fresh
processes (tests/test_cpu_runtime.py). Subprocesses that a test starts inherit the flag through
the environment unless they set their own ``XLA_FLAGS``.

Many tests build the same tiny networks; with the cache each distinct program compiles once per
session instead of once per test. (The cache only stores what XLA compiled; results are the same.)
"""

import os
import tempfile

import jax

from diffusion_jax import cpu_runtime

cpu_runtime.apply_xla_flags()

_CACHE = os.environ.get('DIFFUSION_JAX_TEST_CACHE') or os.path.join(tempfile.gettempdir(),
                                                                    'diffusion_jax_test_xla_cache')
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
