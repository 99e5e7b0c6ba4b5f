"""Every shipped config validates and builds the network it documents; the README documents every
field of configs/default.py."""

import importlib
import os
import re

import pytest

from diffusion_jax import models, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, 'configs')) if f.endswith('.py'))

# Parameter counts: DDPM from Ho et al. (2020) ("35.7M"; 35,746,307 in diffusers'
# google/ddpm-cifar10-32). DDPM++/NCSN++ cont. ("62M"/"63M", Song et al. 2021) as score_sde's NCSNpp
# constructor gives them; tests/test_models.py rebuilds those counts layer by layer.
PARAMS = {'cifar': 35_746_307, 'cifar_vp_cont': 61_804_419, 'cifar_subvp_cont': 61_804_419,
          'cifar_ve_ncsnpp': 62_758_915}


@pytest.mark.parametrize('name', CONFIGS)
def test_config_validates(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  train.validate_config(config)
  doc = importlib.import_module(f'configs.{name}').__doc__
  if name != 'default':
    assert 'python -m diffusion_jax.main' in doc, f'configs/{name}.py docstring lacks its command'


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_published_parameter_counts(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  module, _ = train.build_network(config.model)
  size = config.data.image_size
  assert models.count_params(module, (1, size, size, config.data.num_channels)) == PARAMS[name]


def _leaves(config, prefix=''):
  for key, value in config.items():
    if hasattr(value, 'items'):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}'


def test_readme_documents_every_field():
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  documented = set(re.findall(r'^\| `([a-z_.0-9]+)` \|', readme, flags=re.M))
  fields = set(_leaves(importlib.import_module('configs.default').get_config()))
  assert not fields - documented, f'README lacks: {sorted(fields - documented)}'
  assert not documented - fields, f'README documents fields that do not exist: {sorted(documented - fields)}'
