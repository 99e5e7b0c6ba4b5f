"""Every shipped config validates and builds the network it documents; docs/config.md documents
every field of diffusion_jax/configs/default.py."""

import os
import re

import pytest

from diffusion_jax import configs, models, training
from diffusion_jax.configs import default
from diffusion_jax.training import config as training_config
from diffusion_jax.training import txt2img

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, 'configs')
CONFIGS = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith('.py'))

# Parameter counts: DDPM from Ho et al. (2020) ("35.7M"; 35,746,307 in diffusers'
# google/ddpm-cifar10-32). DDPM++/NCSN++ cont. ("62M"/"63M", Song et al. 2021) as score_sde's NCSNpp
# constructor gives them; tests/test_models.py rebuilds those counts layer by layer.
PARAMS = {'cifar': 35_746_307, 'cifar_vp_cont': 61_804_419, 'cifar_subvp_cont': 61_804_419,
          'cifar_ve_ncsnpp': 62_758_915}


def _load(name):
  """configs/<name>.py by file path, as main's --config flag loads it (configs/ is no package)."""
  return configs.load(os.path.join(CONFIG_DIR, f'{name}.py'))


def test_default_validates():
  training.validate_config(default.get_config())


@pytest.mark.parametrize('name', CONFIGS)
def test_config_validates(name):
  module = _load(name)
  if '--mode=txt2img' in module.__doc__:  # trains nothing: main checks only what txt2img reads
    txt2img.validate_config(module.get_config())
  else:
    training.validate_config(module.get_config())
  assert 'python -m diffusion_jax.main' in module.__doc__, (
      f'configs/{name}.py docstring lacks its command')


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_published_parameter_counts(name):
  config = _load(name).get_config()
  module, _ = training_config.build_network(config.model)
  size = config.data.image_size
  assert models.count_params(module, (1, size, size, config.data.num_channels)) == PARAMS[name]


def _leaves(config, prefix=''):
  for key, value in config.items():
    if hasattr(value, 'items'):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}'


def test_docs_document_every_field():
  with open(os.path.join(REPO, 'docs', 'config.md')) as f:
    text = f.read()
  documented = set(re.findall(r'^\| `([a-z_.0-9]+)` \|', text, flags=re.M))
  fields = set(_leaves(default.get_config()))
  assert not fields - documented, f'docs/config.md lacks: {sorted(fields - documented)}'
  assert not documented - fields, (
      f'docs/config.md documents fields that do not exist: {sorted(documented - fields)}')
