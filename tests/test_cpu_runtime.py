"""cpu_runtime.configure(): what it sets, when it cannot, and that it removes the per-call faults.

Each case runs in a fresh interpreter: the settings are process-wide and JAX reads the dispatch
setting once, when its CPU backend starts.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A computation with a temporary buffer far above glibc's largest mmap threshold (32 MiB): its
# minor page faults per call are counted after warm-up calls.
SCRIPT = r"""
import json, resource, sys
import jax
if sys.argv[1] == 'late':
  jax.numpy.zeros(1).block_until_ready()  # the CPU backend starts before configure()
if sys.argv[1] == 'gpu':
  jax.default_backend = lambda: 'gpu'  # as on an accelerator host
from diffusion_jax import cpu_runtime
applied = cpu_runtime.configure()
if sys.argv[1] == 'gpu':
  print(json.dumps({'applied': applied}))
  sys.exit()
import jax.numpy as jnp

def f(x):
  y = jnp.cumsum(jnp.sin(x))
  return jnp.dot(y[::-1], jnp.cos(y))

x = jnp.full((1 << 23,), 1e-3, jnp.float32)
c = jax.jit(f).lower(x).compile()
per_call = []
for _ in range(8):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  c(x).block_until_ready()
  per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
# The heap settles over the first calls (one or two of the first three re-fault the buffer in
# some runs, at a new place in the heap); the median of the later ones is the steady state.
faults = sorted(per_call[3:])[2]
print(json.dumps({'applied': applied, 'temp': c.memory_analysis().temp_size_in_bytes,
                  'faults': faults, 'async': jax.config.read('jax_cpu_enable_async_dispatch')}))
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc mallopt')


def _run(mode='early', **env_extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu', **env_extra)
  env.pop('XLA_FLAGS', None)  # one device: multi-device computations are always dispatched async
  out = subprocess.run([sys.executable, '-c', SCRIPT, mode], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_configure_removes_the_faults_of_a_large_temporary_buffer():
  on, off = _run(), _run(DIFFUSION_JAX_CPU_RUNTIME='0')
  pages = on['temp'] / 4096
  assert on['temp'] > 64 * 2**20 and on['temp'] == off['temp']
  assert off['applied'] == [] and off['async'] is True
  # Without the settings the buffer is mapped anew on every call: about one fault per 4 KiB page.
  assert off['faults'] > 0.5 * pages, off
  assert on['async'] is False and len(on['applied']) == 2, on
  assert on['faults'] < 0.01 * pages, on


@glibc_only
def test_configure_after_the_backend_started_leaves_dispatch_alone():
  late = _run('late')
  assert late['async'] is True
  assert late['applied'] == ['glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1']


def test_configure_leaves_malloc_alone_when_the_default_backend_is_an_accelerator():
  assert _run('gpu')['applied'] == ['jax_cpu_enable_async_dispatch=False']


def test_configure_respects_the_users_dispatch_setting():
  r = _run(JAX_CPU_ENABLE_ASYNC_DISPATCH='true')
  assert r['async'] is True
  assert not any('dispatch' in a for a in r['applied'])
