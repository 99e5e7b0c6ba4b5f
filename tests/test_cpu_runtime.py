"""cpu_runtime.configure(): what it sets, when it cannot, and that it removes the per-call faults.

Each case runs in a fresh interpreter: the settings are process-wide, and JAX reads the dispatch
setting and XLA its flags once, when the CPU backend starts.
"""

import importlib.metadata
import json
import os
import platform
import subprocess
import sys

import pytest

from diffusion_jax import cpu_runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A computation with a temporary buffer far above glibc's largest mmap threshold (32 MiB): its
# minor page faults per call are counted after warm-up calls.
SCRIPT = r"""
import json, os, resource, sys
import jax
if sys.argv[1] == 'late':
  jax.numpy.zeros(1).block_until_ready()  # the CPU backend starts before configure()
if sys.argv[1] == 'gpu':
  jax.default_backend = lambda: 'gpu'  # as on an accelerator host
from diffusion_jax import cpu_runtime
applied = cpu_runtime.configure()
if sys.argv[1] == 'gpu':
  print(json.dumps({'applied': applied, 'xla_flags': os.environ.get('XLA_FLAGS')}))
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
                  'faults': faults, 'async': jax.config.read('jax_cpu_enable_async_dispatch'),
                  'xla_flags': os.environ.get('XLA_FLAGS')}))
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc mallopt')
TESTED = importlib.metadata.version('jaxlib').startswith(cpu_runtime.TESTED_JAXLIB)
FLAG = cpu_runtime.XLA_CPU_FLAGS[0]
MALLOPT = 'glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1'


def _run(mode='early', xla_flags=None, **env_extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu', **env_extra)
  # One device: multi-device computations are always dispatched async.
  env.pop('XLA_FLAGS', None)
  if xla_flags is not None:
    env['XLA_FLAGS'] = xla_flags
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
  assert on['async'] is False, on
  assert on['applied'][-2:] == ['jax_cpu_enable_async_dispatch=False', MALLOPT], on
  assert on['faults'] < 0.01 * pages, on
  assert off['xla_flags'] is None


@glibc_only
def test_configure_after_the_backend_started_leaves_dispatch_alone():
  late = _run('late')
  assert late['async'] is True
  # XLA has read its flags: the flag is reported as skipped, XLA_FLAGS stays as it was.
  skipped = [f'XLA_FLAGS {FLAG} not applied: JAX backends already started'] if TESTED else []
  assert late['applied'] == skipped + [MALLOPT]
  assert late['xla_flags'] is None


def test_configure_leaves_malloc_alone_when_the_default_backend_is_an_accelerator():
  added = [f'XLA_FLAGS {FLAG}'] if TESTED else []
  assert _run('gpu')['applied'] == added + ['jax_cpu_enable_async_dispatch=False']


def test_configure_respects_the_users_dispatch_setting():
  r = _run(JAX_CPU_ENABLE_ASYNC_DISPATCH='true')
  assert r['async'] is True
  assert not any('dispatch' in a for a in r['applied'])


@pytest.mark.skipif(not TESTED,
                    reason='the XLA flag is only added on the jaxlib it was measured on')
def test_configure_appends_the_xla_flag_to_the_users_flags():
  r = _run('gpu', xla_flags='--xla_cpu_enable_fast_math=false')
  assert r['xla_flags'] == f'--xla_cpu_enable_fast_math=false {FLAG}'
  assert r['applied'][0] == f'XLA_FLAGS {FLAG}'


def test_configure_respects_the_users_xla_flag_and_the_opt_outs():
  own = FLAG.split('=')[0] + '=default'
  r = _run('gpu', xla_flags=own)
  assert r['xla_flags'] == own and not any('XLA_FLAGS' in a for a in r['applied'])
  r = _run('gpu', DIFFUSION_JAX_XLA_DEFAULTS='0')
  assert r['xla_flags'] is None and r['applied'] == ['jax_cpu_enable_async_dispatch=False']
  r = _run('gpu', DIFFUSION_JAX_CPU_RUNTIME='0')
  assert r['xla_flags'] is None and r['applied'] == []


def test_xla_flag_only_on_the_tested_jaxlib(monkeypatch):
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.delenv('DIFFUSION_JAX_XLA_DEFAULTS', raising=False)
  monkeypatch.setattr(importlib.metadata, 'version', lambda name: '0.10.2')
  assert cpu_runtime._missing_xla_flags() == [FLAG]  # pylint: disable=protected-access
  monkeypatch.setattr(importlib.metadata, 'version', lambda name: '0.11.0')
  assert cpu_runtime._missing_xla_flags() == []  # pylint: disable=protected-access
