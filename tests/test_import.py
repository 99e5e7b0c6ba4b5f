"""Importing diffusion_jax has no side effects; cpu_runtime.configure() is where the settings are.

Each case runs in a fresh interpreter: XLA reads XLA_FLAGS once, when the first backend starts,
so only a process whose backends have not started shows what an import or configure() does.
"""

import importlib.metadata
import json
import os
import socket
import subprocess
import sys

import pytest

from diffusion_jax import cpu_runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTED = importlib.metadata.version('jaxlib').startswith(cpu_runtime.TESTED_JAXLIB)

# Imports the package and every module under it, then reports the process state.
IMPORT_ALL = r"""
import importlib, json, os, pkgutil, sys
import diffusion_jax
after_package = os.environ.get('XLA_FLAGS')
names = sorted(m.name for m in pkgutil.walk_packages(diffusion_jax.__path__, 'diffusion_jax.'))
for name in names:
  importlib.import_module(name)
import jax
from jax._src import xla_bridge
print(json.dumps({'after_package': after_package, 'xla_flags': os.environ.get('XLA_FLAGS'),
                  'modules': names, 'backends_started': bool(xla_bridge._backends),
                  'async': jax.config.read('jax_cpu_enable_async_dispatch')}))
"""

# A convolution fused with its elementwise neighbours: jaxlib 0.10 compiles it to a YNNPACK
# fusion ('ynn_fusion' in the compiled HLO) unless --xla_cpu_experimental_ynn_fusion_type=reduce
# keeps convolutions on XLA's own path. So the compiled program shows whether XLA read the flag.
CONFIGURE = r"""
import json, os, sys
import jax, jax.numpy as jnp
import diffusion_jax.models, diffusion_jax.sampling  # before configure(), as main.py's imports
from diffusion_jax import cpu_runtime
if sys.argv[1] == 'distributed':  # main.py's order: jax.distributed first, then configure()
  jax.distributed.initialize(coordinator_address=f'localhost:{sys.argv[2]}', num_processes=1,
                             process_id=0)
applied = cpu_runtime.configure() if sys.argv[1] != 'none' else []

def f(x, w):
  y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return jax.nn.swish(y + 1.0)

hlo = jax.jit(f).lower(jnp.ones((4, 16, 16, 64)), jnp.ones((3, 3, 64, 64))).compile().as_text()
print(json.dumps({'applied': applied, 'xla_flags': os.environ.get('XLA_FLAGS'),
                  'ynn_fusion': 'ynn_fusion' in hlo}))
"""


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return str(s.getsockname()[1])


def _run(script, *args, **env_extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu', **env_extra)
  env.pop('XLA_FLAGS', None)  # the test session's conftest sets it
  out = subprocess.run([sys.executable, '-c', script, *args], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_package_and_its_modules_changes_nothing():
  r = _run(IMPORT_ALL)
  assert r['after_package'] is None
  assert r['xla_flags'] is None, r['xla_flags']
  assert 'diffusion_jax.cpu_runtime' in r['modules'] and 'diffusion_jax.models.unet' in r['modules']
  # No module starts JAX's backends (configure() could no longer set anything) or changes the
  # dispatch default.
  assert r['backends_started'] is False
  assert r['async'] is True


@pytest.mark.skipif(not TESTED,
                    reason='the XLA flag is only added on the jaxlib it was measured on')
def test_configure_applies_the_xla_flag_in_a_fresh_process():
  flag = cpu_runtime.XLA_CPU_FLAGS[0]
  plain = _run(CONFIGURE, 'none')
  assert plain['xla_flags'] is None and plain['ynn_fusion'] is True
  for configured in (_run(CONFIGURE, 'configure'), _run(CONFIGURE, 'distributed', _free_port())):
    assert configured['xla_flags'] == flag
    assert f'XLA_FLAGS {flag}' in configured['applied']
    assert configured['ynn_fusion'] is False  # XLA read the flag: the convolution left YNNPACK.
