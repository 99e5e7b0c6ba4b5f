"""Shared test setup: a persistent XLA compilation cache for the whole session.

Many tests build the same tiny networks; with the cache each distinct program compiles once per
session instead of once per test. (The cache only stores what XLA compiled; results are the same.)
"""

import os
import tempfile

import jax

_CACHE = os.environ.get('DIFFUSION_JAX_TEST_CACHE') or os.path.join(tempfile.gettempdir(),
                                                                    'diffusion_jax_test_xla_cache')
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
