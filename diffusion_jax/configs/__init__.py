"""Config builders shipped with the package: ``default`` names every field.

The experiment configs live in the repository's top-level ``configs/`` and start from
``diffusion_jax.configs.default.get_config()``; builders shared by several of them (``cifar10``)
live here. ``load(path)`` reads a config file as ``--config`` does (``configs/digits_flow.py``
starts from its sibling ``digits.py`` that way). Nothing here imports JAX.
"""

import importlib.util
import os
import types


def load(path: str | os.PathLike) -> types.ModuleType:
  """The config file at ``path`` (e.g. ``configs/digits.py``) as a module, as ``--config`` loads it.

  The experiment configs are files, not a package on ``sys.path``; call ``.get_config()`` on the
  result. Raises FileNotFoundError when there is no such file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No config file {path!r}.')
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'_diffusion_jax_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
