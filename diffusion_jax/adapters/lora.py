"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as a tree transform.

A LoRA does not rewrite the network: it is a tree of low-rank factors keyed by the paths of the
parameters it changes, and ``merge`` adds ``scale * (alpha / r) * (A^T B^T)`` to those leaves
(eq. 3 of the paper, ``h = W0 x + (alpha / r) B A x``, with our kernels' ``[in, out]`` layout).

The tree mirrors the parameter tree down to each adapted ``kernel`` leaf, whose place holds a
``LoraWeight``:

=====================  =========================  ============================================
leaf                   ``a``                      ``b``
=====================  =========================  ============================================
Dense ``[in, out]``    ``[in, r]`` (PEFT's        ``[r, out]`` (PEFT's ``lora_B.weight``
                       ``lora_A.weight`` ``.T``)  ``.T``)
Conv ``[kh, kw, I,     ``[kh, kw, I, r]`` (a conv ``[r, O]`` (a 1x1 conv, PEFT's ``lora_B``
O]``                   with the base kernel's     ``[O, r, 1, 1]``)
                       size, PEFT's ``lora_A``
                       ``[r, I, kh, kw]``)
=====================  =========================  ============================================

so the update is always ``tensordot(a, b, 1)``, a kernel of the base's shape; a convolution's
LoRA is the reshaped-matrix form of kohya and PEFT (``B A`` on ``[O, I kh kw]``). ``alpha`` is a
static field (not a leaf): optimizers, EMAs and ``jax.tree.map`` see only ``a`` and ``b``.
A pipeline's LoRA is keyed by component first, as ``pipe.params``:
``{'unet': {...}, 'text_encoder': {...}, 'text_encoder_2': {...}}``.

Training only the LoRA: the base is a frozen tree and the merge happens inside the jitted loss,
so gradients reach ``a`` and ``b`` only (DESIGN.md's ``loss_fn(params, frozen, batch, key)``)::

  lora = init_lora(base, rank=4, alpha=4, key=key)          # b = 0: starts at the base model
  def loss_fn(lora, frozen, batch, key):
    params = merge(frozen, lora)                            # W + (alpha / r) a b, traced
    ...

Files (``read_lora`` / ``lora_from_state`` and ``save_lora`` / ``lora_state``):

- diffusers / PEFT (``pytorch_lora_weights.safetensors``): ``unet.<diffusers module>.lora_A.weight``
  and ``.lora_B.weight``, ``text_encoder.`` / ``text_encoder_2.`` with or without
  ``text_model.`` (transformers 5's ``CLIPTextModel`` has none); alpha from ``<module>.alpha``
  tensors or from the adapter config diffusers stores in the safetensors metadata
  (``lora_adapter_metadata``: ``<prefix>.lora_alpha``, ``<prefix>.alpha_pattern``,
  ``<prefix>.use_rslora``); diffusers' older ``.lora.down.weight`` / ``.lora.up.weight``,
  ``.lora_linear_layer.{down,up}.weight`` and attention-processor
  ``processor.to_q_lora.down.weight`` forms are read too.
- kohya (sd-scripts, A1111): ``lora_unet_<diffusers module, '.' -> '_'>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``; SDXL files name the U-Net's modules in the original LDM layout
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), read when the U-Net module is
  given; ``lora_te_`` (SD 1.x / 2.x), ``lora_te1_`` / ``lora_te2_`` (SDXL).

The rank is read from the shapes. A module without any stored alpha gets ``alpha = rank``
(scale 1), the convention of diffusers, PEFT's loader and kohya. Every key is looked up in a table
built from our parameter tree (never parsed back from kohya's underscores): a key that names no
parameter is a ``ValueError`` naming the first such key.

Pipelines: ``load_lora_weights(pipe, path, scale=, adapter_name=)`` merges a file into
``pipe.params`` and keeps the base values of the leaves it touches (on the pipeline object), so
several LoRAs add up with their own scales (``set_lora_scale``, ``delete_adapter``) and
``unload_lora_weights`` restores the base bitwise. ``unmerge`` of a tree subtracts instead: float32
round-off (measured 0.3-0.44 eps of ``max |W + delta|`` in tests/test_lora.py).

Measured (tests/test_lora.py, CPU float32): a tiny SD 1.x pipeline with a PEFT LoRA on the U-Net's
attention (r 4, alpha 8) and the text encoder's (r 2, alpha 3) written by diffusers'
``save_lora_weights`` gives diffusers' final latents (3 DDIM steps, guidance 7.5) to 2.7e-6
(scale 1) and 3.3e-6 (scale 0.5) of their largest value; its kohya renaming gives the same. A
tiny SDXL pipeline with LoRAs on the U-Net and both text encoders: 2.0e-6.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util
from safetensors import numpy as st_numpy

from diffusion_jax.weights import clip as clip_weights
from diffusion_jax.weights import core
from diffusion_jax.weights import unet as unet_weights

PyTree = Any
Path = tuple[str, ...]

WEIGHT_NAME = 'pytorch_lora_weights.safetensors'
METADATA_KEY = 'lora_adapter_metadata'  # diffusers' LORA_ADAPTER_METADATA_KEY

# Our module names (the last name before ``kernel``) that ``init_lora`` adapts by default: the
# attention projections of the U-Net (diffusers' to_q/to_k/to_v/to_out.0) and of CLIP.
ATTENTION_TARGETS = ('to_q', 'to_k', 'to_v', 'to_out_0', 'q_proj', 'k_proj', 'v_proj', 'out_proj')
# The U-Net's convolutions and 1x1 projections (kohya's "LoCon" set), for ``targets=``.
CONV_TARGETS = ('conv1', 'conv2', 'conv_shortcut', 'conv', 'conv_in', 'conv_out', 'proj_in',
                'proj_out')

# File prefixes of each pipeline component: diffusers / PEFT, then kohya's (SD, SDXL).
COMPONENT_PREFIXES = {
    'unet': ('unet.', ('lora_unet_',)),
    'text_encoder': ('text_encoder.', ('lora_te_', 'lora_te1_')),
    'text_encoder_2': ('text_encoder_2.', ('lora_te2_',)),
}
_KOHYA_WRITE = {'unet': 'lora_unet_', 'text_encoder': 'lora_te_', 'text_encoder_2': 'lora_te2_'}
_KOHYA_WRITE_SDXL = {'unet': 'lora_unet_', 'text_encoder': 'lora_te1_',
                     'text_encoder_2': 'lora_te2_'}

# diffusers' older suffixes -> (role, module-name rewrite); see diffusers'
# utils/state_dict_utils.py UNET_TO_DIFFUSERS / DIFFUSERS_OLD_TO_PEFT.
_OLD_PROCESSOR = re.compile(r'^(.*?)(?:\.processor)?\.to_(q|k|v|out)_lora\.(down|up)\.weight$')
_UNET_PROC = {'q': 'to_q', 'k': 'to_k', 'v': 'to_v', 'out': 'to_out.0'}
_TEXT_PROC = {'q': 'q_proj', 'k': 'k_proj', 'v': 'v_proj', 'out': 'out_proj'}


class LoraWeight(flax.struct.PyTreeNode):
  """The low-rank update of one kernel: ``delta = (alpha / r) * tensordot(a, b, 1)``.

  Attributes:
    a: ``[in, r]`` for a Dense kernel ``[in, out]``; ``[kh, kw, in, r]`` for a conv kernel.
    b: ``[r, out]``.
    alpha: the scale numerator (static, not trained); ``alpha = r`` is scale 1.
  """
  a: jax.Array
  b: jax.Array
  alpha: float = flax.struct.field(pytree_node=False, default=1.0)

  @property
  def rank(self) -> int:
    return int(self.a.shape[-1])

  def delta(self, dtype: Any = jnp.float32) -> jax.Array:
    """``(alpha / r) * tensordot(a, b, 1)``: the kernel-shaped update, computed in float32."""
    a = jnp.asarray(self.a, jnp.float32)
    b = jnp.asarray(self.b, jnp.float32)
    # HIGHEST: GPUs default to TF32 and TPUs to bf16 passes for float32 matmuls.
    d = jnp.tensordot(a, b, axes=1, precision=jax.lax.Precision.HIGHEST)
    return (d * (self.alpha / self.rank)).astype(dtype)


def _is_lora(x: Any) -> bool:
  return isinstance(x, LoraWeight)


def flatten(lora: PyTree) -> dict[Path, LoraWeight]:
  """``{path of the adapted kernel: LoraWeight}`` (``flax.traverse_util.flatten_dict``)."""
  return traverse_util.flatten_dict(_as_dict(lora))


def _as_dict(tree: PyTree) -> Any:
  if isinstance(tree, Mapping):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def num_parameters(lora: PyTree) -> int:
  """Number of trained numbers (``a`` and ``b`` entries) of a LoRA tree."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora))


# --- merging --------------------------------------------------------------------------------------

def merge(params: PyTree, lora: PyTree, *, scale: float | jax.Array = 1.0) -> PyTree:
  """``params`` with ``scale * delta`` added to each adapted kernel (the rest passed through).

  Pure and traceable: call it inside a jitted loss to train ``lora`` against a frozen base.

  Args:
    params: a parameter tree (nested dicts), e.g. ``pipe.params`` or ``pipe.params['unet']``.
    lora: a LoRA tree with the same nesting down to the adapted kernels.
    scale: the LoRA's weight (diffusers' ``lora_scale`` / ``cross_attention_kwargs['scale']``).

  Returns:
    A new tree; adapted leaves are computed in float32 and cast to their dtype.

  Raises:
    ValueError: a LoRA path that is no leaf of ``params``, or a factor shape that does not fit.
  """
  return merge_many(params, [(lora, scale)])


def unmerge(params: PyTree, lora: PyTree, *, scale: float | jax.Array = 1.0) -> PyTree:
  """The inverse of ``merge`` up to float round-off: subtracts ``scale * delta``.

  ``unmerge(merge(W, l), l)`` is ``W`` to within float32 round-off of ``|W| + |delta|``;
  ``load_lora_weights`` / ``unload_lora_weights`` keep the base leaves instead and restore them
  bitwise.
  """
  return merge_many(params, [(lora, -scale)])


def merge_many(params: PyTree, loras: Sequence[tuple[PyTree, float | jax.Array]]) -> PyTree:
  """Several LoRAs with their own scales: ``W + sum_i scale_i delta_i`` (one rounding per leaf).

  Raises:
    ValueError: as ``merge``.
  """
  flat = traverse_util.flatten_dict(_as_dict(params))
  deltas: dict[Path, jax.Array] = {}
  for lora, scale in loras:
    for path, w in flatten(lora).items():
      if not _is_lora(w):
        raise ValueError(f'LoRA leaf {"/".join(path)} is a {type(w).__name__}, not a LoraWeight.')
      if path not in flat:
        raise ValueError(f'the LoRA adapts {"/".join(path)}, which is no parameter of the tree: '
                         'the LoRA is for another model or is nested differently (a pipeline '
                         "LoRA is keyed 'unet' / 'text_encoder' first, as pipe.params).")
      _check_fits(path, w, flat[path].shape)
      d = w.delta() * scale
      deltas[path] = d if path not in deltas else deltas[path] + d
  for path, d in deltas.items():
    base = flat[path]
    flat[path] = (jnp.asarray(base, jnp.float32) + d).astype(base.dtype)
  return traverse_util.unflatten_dict(flat)


def _check_fits(path: Path, w: LoraWeight, shape: tuple[int, ...]) -> None:
  expect_a = tuple(shape[:-1]) + (w.rank,)
  if tuple(w.a.shape) != expect_a or tuple(w.b.shape) != (w.rank, shape[-1]):
    raise ValueError(f'LoRA factors for {"/".join(path)} have shapes a {tuple(w.a.shape)}, '
                     f'b {tuple(w.b.shape)}; the kernel {tuple(shape)} needs a {expect_a}, '
                     f'b {(w.rank, shape[-1])}.')


# --- creating -------------------------------------------------------------------------------------

def _matches(path: Path, targets: Sequence[str] | Callable[[Path], bool]) -> bool:
  if callable(targets):
    return bool(targets(path))
  modules = path[:-1]
  for t in targets:
    names = tuple(t.replace('.', '/').split('/'))
    if modules[-len(names):] == names:
      return True
  return False


def init_lora(params: PyTree, *, rank: int, key: jax.Array, alpha: float | None = None,
              targets: Sequence[str] | Callable[[Path], bool] = ATTENTION_TARGETS,
              dtype: Any = jnp.float32) -> PyTree:
  """A fresh LoRA on the ``kernel`` leaves of ``params`` whose module matches ``targets``.

  ``a`` as PEFT initializes ``lora_A`` (``kaiming_uniform(a=sqrt(5))``: uniform in
  ``+-1 / sqrt(fan_in)``, ``fan_in = in * kh * kw``), ``b = 0``, so the merged model starts as
  the base model (Hu et al. 2021, Sec. 4.1).

  Args:
    params: the base tree (arrays or ``jax.ShapeDtypeStruct`` s), any nesting; for a pipeline
      pass the components to adapt, e.g. ``{'unet': pipe.params['unet']}`` (the VAE's attention
      has ``to_q`` too, and LoRA files hold only the U-Net and text encoders).
    rank: r, at least 1.
    key: PRNG key.
    alpha: the scale numerator; None: ``alpha = rank`` (scale 1).
    targets: module names (the last name(s) of the path before ``kernel``: ``'to_q'``,
      ``'to_out_0'`` or ``'to_out.0'``, ``'attn2/to_k'``) or ``fn(path) -> bool`` on the leaf's
      path. Only 2-D (Dense) and 4-D (conv) kernels are adapted.
    dtype: dtype of the factors.

  Returns:
    The LoRA tree.

  Raises:
    ValueError: ``rank < 1``, or no kernel matched ``targets``.
  """
  if int(rank) < 1:
    raise ValueError(f'rank must be >= 1, got {rank}.')
  rank = int(rank)
  alpha = float(rank if alpha is None else alpha)
  flat = traverse_util.flatten_dict(_as_dict(params))
  chosen = [p for p, v in flat.items()
            if p[-1] == 'kernel' and len(v.shape) in (2, 4) and _matches(p, targets)]
  if not chosen:
    raise ValueError(f'no kernel of the tree matches targets={targets!r}; module names are our '
                     "paths' names, e.g. 'to_q', 'to_out_0', 'q_proj', 'conv1'.")
  out = {}
  for i, path in enumerate(sorted(chosen)):
    shape = tuple(flat[path].shape)
    fan_in = int(np.prod(shape[:-1]))
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), shape[:-1] + (rank,), dtype, -bound, bound)
    out[path] = LoraWeight(a=a, b=jnp.zeros((rank, shape[-1]), dtype), alpha=alpha)
  return traverse_util.unflatten_dict(out)


# --- the key table --------------------------------------------------------------------------------

def _component_key_fns(component: str) -> tuple[Callable[[Path], str], ...]:
  """Our path -> the component's PyTorch key(s); the first is the one written."""
  if component == 'unet':
    return (unet_weights.unet_key,)
  if component.startswith('text_encoder'):
    return (lambda p: clip_weights.text_encoder_key(p, prefix='text_model.'),
            lambda p: clip_weights.text_encoder_key(p, prefix=''))
  raise ValueError(f'LoRA component {component!r} is not known; use one of '
                   f'{sorted(COMPONENT_PREFIXES)}.')


@dataclasses.dataclass(frozen=True)
class _Entry:
  component: str
  path: Path  # our path inside the component, ending in 'kernel'
  shape: tuple[int, ...]


def _table(shapes: Mapping[str, PyTree], unet_module: Any = None) -> dict[str, _Entry]:
  """Every name a file may give an adaptable kernel -> its entry.

  Names: ``'<peft prefix><module>'`` (each key form of the component) and
  ``'<kohya prefix><module with _>'`` (and, for the U-Net with ``unet_module``, the LDM names).
  """
  table = {}
  for component, tree in shapes.items():
    if component not in COMPONENT_PREFIXES:
      continue
    peft_prefix, kohya_prefixes = COMPONENT_PREFIXES[component]
    for path, leaf in traverse_util.flatten_dict(_as_dict(tree)).items():
      if path[-1] != 'kernel' or len(leaf.shape) not in (2, 4):
        continue
      entry = _Entry(component, path, tuple(leaf.shape))
      modules = [fn(path).removesuffix('.weight') for fn in _component_key_fns(component)]
      if component == 'unet' and unet_module is not None:
        ldm = unet_weights.ldm_key(modules[0] + '.weight', unet_module).removesuffix('.weight')
        kohya_modules = [modules[0], ldm]
      else:
        kohya_modules = modules
      for m in modules:
        table[peft_prefix + m] = entry
      for kp in kohya_prefixes:
        for m in kohya_modules:
          table[kp + m.replace('.', '_')] = entry
  return table


def _split_key(key: str) -> tuple[str, str] | None:
  """``key`` -> (module name as the table knows it, role in 'A' | 'B' | 'alpha'), or None."""
  for suffix, role in (('.lora_A.weight', 'A'), ('.lora_B.weight', 'B'),
                       ('.lora_down.weight', 'A'), ('.lora_up.weight', 'B'),
                       ('.lora_linear_layer.down.weight', 'A'),
                       ('.lora_linear_layer.up.weight', 'B'),
                       ('.lora.down.weight', 'A'), ('.lora.up.weight', 'B'), ('.alpha', 'alpha')):
    if key.endswith(suffix) and not _OLD_PROCESSOR.match(key):
      return key[:-len(suffix)], role
  m = _OLD_PROCESSOR.match(key)
  if m:
    stem, which, direction = m.groups()
    names = _TEXT_PROC if stem.split('.', 1)[0].startswith('text_encoder') else _UNET_PROC
    return f'{stem}.{names[which]}', 'A' if direction == 'down' else 'B'
  return None


def _component_prefix(state: Mapping[str, np.ndarray]) -> str:
  """Old attention-processor files hold bare U-Net keys (no ``unet.``): the prefix they lack."""
  known = tuple(p for peft, kohya in COMPONENT_PREFIXES.values() for p in (peft, *kohya))
  return '' if any(k.startswith(known) for k in state) else 'unet.'



# --- reading --------------------------------------------------------------------------------------

def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any:
  """PEFT's rank/alpha pattern lookup: the key matching the end of the module name."""
  for pattern, value in patterns.items():
    if re.match(rf'(.*\.)?({pattern})$', module):
      return value
  return None


def lora_from_state(state: Mapping[str, np.ndarray], shapes: Mapping[str, PyTree], *,
                    metadata: Mapping[str, Any] | None = None, unet_module: Any = None,
                    dtype: Any = jnp.float32) -> PyTree:
  """A LoRA tree from a file's tensors (any layout of the module docstring).

  Args:
    state: key -> array (``core.read_safetensors``), PyTorch layout.
    shapes: ``{component: parameter tree}`` the LoRA is for (arrays or ShapeDtypeStructs), e.g.
      ``pipe.params``; components ``'unet'``, ``'text_encoder'``, ``'text_encoder_2'``.
    metadata: diffusers' adapter metadata (the parsed ``lora_adapter_metadata`` JSON:
      ``'<component>.lora_alpha'``, ``'<component>.alpha_pattern'``, ``'<component>.use_rslora'``).
    unet_module: the ``UNet2DConditionModel``; needed only for kohya SDXL files, which name the
      U-Net's modules in the LDM layout.
    dtype: dtype of the factors.

  Returns:
    ``{component: {...: LoraWeight}}``. Alpha per module: a stored ``.alpha`` tensor, else the
    metadata's ``alpha_pattern`` / ``lora_alpha`` (times ``sqrt(r)`` when ``use_rslora``, whose
    scale is ``alpha / sqrt(r)``), else ``alpha = r``.

  Raises:
    ValueError: naming the first key that names no parameter of ``shapes`` (a LoRA for another
      architecture), a LoRA type we do not read (DoRA, LoHa, ...), a module with only one factor,
      or factors whose shapes do not fit the kernel.
  """
  prefix = _component_prefix(state)
  table = _table(shapes, unet_module)
  found: dict[_Entry, dict[str, Any]] = {}
  names: dict[_Entry, str] = {}
  for key in sorted(state):  # errors name the key as the file spells it
    split = _split_key(prefix + key)
    if split is None:
      raise ValueError(f'LoRA key {key!r} is not a LoRA factor or alpha we read (lora_A / lora_B, '
                       'lora_down / lora_up, .alpha); DoRA, LoHa, LoKr and other LyCORIS types '
                       'are not supported.')
    module, role = split
    entry = table.get(module)
    if entry is None:
      hint = ('' if unet_module is not None or not module.startswith('lora_unet_') else
              ' (a kohya SDXL file names U-Net modules in the LDM layout: pass unet_module)')
      raise ValueError(f'LoRA key {key!r} names no parameter of the model ({module!r} is not a '
                       f'2-D or 4-D kernel of {sorted(shapes)}): the LoRA is for another '
                       f'architecture or configuration{hint}.')
    found.setdefault(entry, {})[role] = state[key]
    names.setdefault(entry, module)
  metadata = metadata or {}
  out = {}
  for entry, parts in found.items():
    name = names[entry]
    if 'A' not in parts or 'B' not in parts:
      raise ValueError(f'LoRA module {name!r} has {sorted(parts)} but needs both factors '
                       '(lora_A and lora_B, or lora_down and lora_up).')
    a, b = _factors_to_ours(name, np.asarray(parts['A']), np.asarray(parts['B']), entry.shape)
    rank = a.shape[-1]
    out[(entry.component,) + entry.path] = LoraWeight(
        a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype),
        alpha=_alpha(parts.get('alpha'), metadata, entry, rank))
  return traverse_util.unflatten_dict(out)


def _alpha(stored: Any, metadata: Mapping[str, Any], entry: _Entry, rank: int) -> float:
  if stored is not None:
    return float(np.asarray(stored, np.float32).reshape(()))
  c = entry.component
  alpha = None
  for fn in _component_key_fns(c):  # patterns may name text modules with or without text_model.
    alpha = _pattern_value(metadata.get(f'{c}.alpha_pattern') or {},
                           fn(entry.path).removesuffix('.weight'))
    if alpha is not None:
      break
  if alpha is None:
    alpha = metadata.get(f'{c}.lora_alpha')
  if alpha is None:
    return float(rank)  # no alpha stored anywhere: scale 1, as diffusers / PEFT / kohya
  alpha = float(alpha)
  if metadata.get(f'{c}.use_rslora'):
    alpha *= math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r) = (alpha sqrt(r)) / r
  return alpha


def _factors_to_ours(name: str, a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]
                     ) -> tuple[np.ndarray, np.ndarray]:
  """PEFT ``lora_A`` [r, I(, kh, kw)] and ``lora_B`` [O, r(, 1, 1)] -> our ``a``, ``b``."""
  rank = a.shape[0]
  if len(shape) == 2:
    if a.ndim == 4 and a.shape[2:] == (1, 1):  # a 1x1-conv LoRA on a Linear (old SD 2 files)
      a, b = a[:, :, 0, 0], b[:, :, 0, 0]
    ours_a, ours_b = (a.T, b.T) if a.ndim == 2 and b.ndim == 2 else (None, None)
  elif a.ndim == 4 and b.ndim == 4 and b.shape[2:] == (1, 1):
    ours_a, ours_b = a.transpose(2, 3, 1, 0), b[:, :, 0, 0].T
  elif a.ndim == 2 and b.ndim == 2 and shape[:2] == (1, 1):  # a Linear LoRA on a 1x1 conv
    ours_a, ours_b = a.T[None, None], b.T
  else:
    ours_a, ours_b = None, None
  expect_a = tuple(shape[:-1]) + (rank,)
  if ours_a is None or ours_a.shape != expect_a or ours_b.shape != (rank, shape[-1]):
    torch_kernel = (shape[-1], shape[-2]) + tuple(shape[:-2]) if len(shape) == 4 else shape[::-1]
    raise ValueError(f'LoRA module {name!r}: factors of shapes A {tuple(a.shape)}, '
                     f'B {tuple(b.shape)} do not fit the weight {tuple(torch_kernel)} '
                     '(PyTorch layout): the LoRA is for another configuration.')
  return ours_a, ours_b


def read_metadata(path: str | epath.PathLike) -> dict[str, Any]:
  """The ``__metadata__`` strings of a safetensors file (its JSON header), without the tensors."""
  with epath.Path(path).open('rb') as f:
    n = int.from_bytes(f.read(8), 'little')
    header = json.loads(f.read(n))
  return dict(header.get('__metadata__') or {})


def lora_file(path: str | epath.PathLike) -> epath.Path:
  """``path`` itself, or ``path/pytorch_lora_weights.safetensors`` for a directory.

  Raises:
    FileNotFoundError: no such file; pickle files (``.bin``, ``.pt``, ``.ckpt``) are never read.
  """
  path = epath.Path(path)
  if path.is_dir():
    candidates = sorted(p for p in path.iterdir() if p.name.endswith('.safetensors'))
    if (path / WEIGHT_NAME).exists():
      return path / WEIGHT_NAME
    if len(candidates) == 1:
      return candidates[0]
    raise FileNotFoundError(f'{path} holds {"no" if not candidates else "several"} .safetensors '
                            f'files ({[p.name for p in candidates]}) and no {WEIGHT_NAME}: pass '
                            'the file itself.')
  if not path.exists():
    raise FileNotFoundError(f'no LoRA file {path}.')
  if not path.name.endswith('.safetensors'):
    raise FileNotFoundError(f'{path} is not a .safetensors file; pickle files are never loaded: '
                            'convert it to safetensors first.')
  return path


def read_lora(path: str | epath.PathLike, shapes: Mapping[str, PyTree], *,
              unet_module: Any = None, dtype: Any = jnp.float32) -> PyTree:
  """A LoRA tree from a ``.safetensors`` file (or a directory holding ``WEIGHT_NAME``).

  See ``lora_from_state`` for ``shapes``, ``unet_module`` and the errors; the adapter metadata
  diffusers writes is read from the file's header.
  """
  path = lora_file(path)
  meta = read_metadata(path).get(METADATA_KEY)
  try:
    metadata = json.loads(meta) if meta else None
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: the {METADATA_KEY} metadata is not valid JSON: {e}') from e
  return lora_from_state(core.read_safetensors(path), shapes, metadata=metadata,
                         unet_module=unet_module, dtype=dtype)


# --- writing --------------------------------------------------------------------------------------

LAYOUTS = ('peft', 'kohya')


def lora_state(lora: PyTree, *, layout: str = 'peft', unet_module: Any = None,
               sdxl: bool = False, dtype: Any = np.float32
               ) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
  """The tensors (PyTorch layout) and adapter metadata of a LoRA tree, for a file.

  Args:
    lora: ``{component: {...: LoraWeight}}``.
    layout: ``'peft'`` (diffusers' ``save_lora_weights`` layout: ``lora_A`` / ``lora_B`` keys, the
      alphas in diffusers' adapter metadata: ``lora_alpha`` the most common alpha, others in
      ``alpha_pattern``) or ``'kohya'`` (``lora_down`` / ``lora_up`` and an ``.alpha`` tensor per
      module).
    unet_module: kohya only: the U-Net module, to name its modules in the LDM layout (what
      kohya's SDXL scripts write); None: diffusers' names (as kohya's SD 1.x / 2.x files).
    sdxl: kohya only: name the first text encoder ``lora_te1_`` (SDXL) instead of ``lora_te_``.
    dtype: dtype of the written factors.

  Returns:
    ``(tensors, metadata)``; metadata is None for kohya.

  Raises:
    ValueError: an unknown layout or component.
  """
  if layout not in LAYOUTS:
    raise ValueError(f'layout={layout!r} is not known; use one of {LAYOUTS}.')
  tensors, metadata = {}, {}
  by_component: dict[str, dict[Path, LoraWeight]] = {}
  for path, w in flatten(lora).items():
    by_component.setdefault(path[0], {})[path[1:]] = w
  for component, weights in by_component.items():
    key_fns = _component_key_fns(component)
    alphas = {}
    for path, w in sorted(weights.items()):
      module = key_fns[0](path).removesuffix('.weight')
      a = np.asarray(jax.device_get(w.a), np.float32)
      b = np.asarray(jax.device_get(w.b), np.float32)
      if a.ndim == 4:
        a_t, b_t = a.transpose(3, 2, 0, 1), b.T[:, :, None, None]
      else:
        a_t, b_t = a.T, b.T
      if layout == 'peft':
        name = f'{component}.{module}'
        tensors[f'{name}.lora_A.weight'] = np.ascontiguousarray(a_t, dtype)
        tensors[f'{name}.lora_B.weight'] = np.ascontiguousarray(b_t, dtype)
        # Patterns without text_model.: they match the module names of every transformers version.
        alphas[key_fns[-1](path).removesuffix('.weight')] = (w.alpha, w.rank)
      else:
        if component == 'unet' and unet_module is not None:
          module = unet_weights.ldm_key(module + '.weight', unet_module).removesuffix('.weight')
        prefix = (_KOHYA_WRITE_SDXL if sdxl else _KOHYA_WRITE)[component]
        name = prefix + module.replace('.', '_')
        tensors[f'{name}.lora_down.weight'] = np.ascontiguousarray(a_t, dtype)
        tensors[f'{name}.lora_up.weight'] = np.ascontiguousarray(b_t, dtype)
        tensors[f'{name}.alpha'] = np.asarray(w.alpha, np.float32)
    if layout == 'peft':
      metadata.update(_peft_metadata(component, alphas))
  return tensors, (metadata if layout == 'peft' else None)


def _peft_metadata(component: str, alphas: Mapping[str, tuple[float, int]]) -> dict[str, Any]:
  """diffusers' adapter metadata (PEFT ``LoraConfig`` fields) for one component."""
  def common(values):
    values = list(values)
    return max(set(values), key=values.count)
  r = common(rank for _, rank in alphas.values())
  alpha = common(a for a, _ in alphas.values())
  as_number = lambda x: int(x) if float(x).is_integer() else float(x)  # noqa: E731
  targets = sorted({m.rsplit('.', 2)[-2] + '.' + m.rsplit('.', 1)[-1]
                    if m.endswith('.0') else m.rsplit('.', 1)[-1] for m in alphas})
  return {
      f'{component}.r': int(r),
      f'{component}.lora_alpha': as_number(alpha),
      f'{component}.rank_pattern': {m: int(k) for m, (_, k) in alphas.items() if k != r},
      f'{component}.alpha_pattern': {m: as_number(a) for m, (a, _) in alphas.items() if a != alpha},
      f'{component}.target_modules': targets,
      f'{component}.peft_type': 'LORA',
      f'{component}.bias': 'none',
      f'{component}.lora_dropout': 0.0,
      f'{component}.use_rslora': False,
      f'{component}.use_dora': False,
      f'{component}.init_lora_weights': True,
  }


def save_lora(path: str | epath.PathLike, lora: PyTree, *, layout: str = 'peft',
              unet_module: Any = None, sdxl: bool = False, dtype: Any = np.float32) -> epath.Path:
  """Writes a LoRA tree as a ``.safetensors`` file (``lora_state``'s layouts).

  Args:
    path: a ``.safetensors`` file, or a directory (created) that gets ``WEIGHT_NAME``, as
      diffusers' ``save_lora_weights`` writes it.
    lora, layout, unet_module, sdxl, dtype: as ``lora_state``.

  Returns:
    The file written.
  """
  path = epath.Path(path)
  if not path.name.endswith('.safetensors'):
    path.mkdir(parents=True, exist_ok=True)
    path = path / WEIGHT_NAME
  tensors, metadata = lora_state(lora, layout=layout, unet_module=unet_module, sdxl=sdxl,
                                 dtype=dtype)
  header = {'format': 'pt'}
  if metadata:
    header[METADATA_KEY] = json.dumps(metadata, indent=2, sort_keys=True)
  path.write_bytes(st_numpy.save(tensors, metadata=header))
  return path


# --- pipelines ------------------------------------------------------------------------------------

@dataclasses.dataclass
class _PipelineLoras:
  """What ``load_lora_weights`` merged into a pipeline: adapters and the untouched base leaves."""
  adapters: dict[str, tuple[PyTree, float]] = dataclasses.field(default_factory=dict)
  base: dict[Path, jax.Array] = dataclasses.field(default_factory=dict)


_STATE_ATTR = '_lora_adapters'


def _pipeline_state(pipe: Any) -> _PipelineLoras:
  state = getattr(pipe, _STATE_ATTR, None)
  if state is None:
    state = _PipelineLoras()
    setattr(pipe, _STATE_ATTR, state)
  return state


def _remerge(pipe: Any, state: _PipelineLoras) -> None:
  """``pipe.params`` = base + sum of the adapters' scaled deltas, from the kept base leaves."""
  flat = traverse_util.flatten_dict(_as_dict(pipe.params))
  for path, base in state.base.items():
    flat[path] = base
  touched: dict[Path, jax.Array] = {}
  for lora, scale in state.adapters.values():
    for path, w in flatten(lora).items():
      d = w.delta() * scale
      touched[path] = d if path not in touched else touched[path] + d
  for path, d in touched.items():
    base = state.base[path]
    new = (jnp.asarray(base, jnp.float32) + d).astype(base.dtype)
    sharding = getattr(base, 'sharding', None)
    flat[path] = jax.device_put(new, sharding) if sharding is not None else new
  pipe.params = traverse_util.unflatten_dict(flat)


def load_lora_weights(pipe: Any, path: str | epath.PathLike, *, scale: float = 1.0,
                      adapter_name: str | None = None) -> str:
  """Merges a LoRA file into a ``StableDiffusionPipeline``'s parameters (diffusers' method).

  The file may be in any layout of the module docstring. The pipeline keeps the base values of
  the leaves LoRAs touch, so that several LoRAs add up with their own scales (``set_lora_scale``)
  and ``unload_lora_weights`` restores the base bitwise; each change recomputes
  ``base + sum_i scale_i delta_i`` from the kept base (no round-off accumulates).

  Args:
    pipe: a ``pipelines.StableDiffusionPipeline`` (uses ``params`` and ``unet``).
    path: a ``.safetensors`` file or a directory holding ``pytorch_lora_weights.safetensors``.
    scale: this LoRA's weight.
    adapter_name: a name for it; default ``'default_<n>'`` (as diffusers).

  Returns:
    The adapter's name.

  Raises:
    FileNotFoundError: no such file.
    ValueError: a name already loaded, or a file that does not fit (``lora_from_state``).
  """
  state = _pipeline_state(pipe)
  if adapter_name is None:
    adapter_name = f'default_{len(state.adapters)}'
  if adapter_name in state.adapters:
    raise ValueError(f'adapter {adapter_name!r} is loaded already; pass another adapter_name or '
                     'unload_lora_weights(pipe) first.')
  params = _as_dict(pipe.params)
  shapes = {c: params[c] for c in COMPONENT_PREFIXES if c in params}
  lora = read_lora(path, shapes, unet_module=getattr(pipe, 'unet', None))
  flat = traverse_util.flatten_dict(params)
  for p in flatten(lora):
    state.base.setdefault(p, flat[p])
  state.adapters[adapter_name] = (lora, float(scale))
  _remerge(pipe, state)
  return adapter_name


def set_lora_scale(pipe: Any, adapter_name: str, scale: float) -> None:
  """Changes one loaded adapter's weight (diffusers' ``set_adapters(name, weight)``).

  Raises:
    ValueError: no adapter of that name.
  """
  state = _pipeline_state(pipe)
  if adapter_name not in state.adapters:
    raise ValueError(f'no adapter {adapter_name!r} is loaded; loaded: {sorted(state.adapters)}.')
  state.adapters[adapter_name] = (state.adapters[adapter_name][0], float(scale))
  _remerge(pipe, state)


def delete_adapter(pipe: Any, adapter_name: str) -> None:
  """Removes one adapter; the others stay merged. ValueError if none has that name."""
  state = _pipeline_state(pipe)
  if adapter_name not in state.adapters:
    raise ValueError(f'no adapter {adapter_name!r} is loaded; loaded: {sorted(state.adapters)}.')
  del state.adapters[adapter_name]
  _remerge(pipe, state)


def get_adapters(pipe: Any) -> dict[str, float]:
  """``{adapter name: scale}`` of the LoRAs merged into ``pipe``."""
  return {n: s for n, (_, s) in _pipeline_state(pipe).adapters.items()}


def unload_lora_weights(pipe: Any) -> None:
  """Removes every LoRA: the touched leaves get their kept base values back (bitwise)."""
  state = _pipeline_state(pipe)
  state.adapters.clear()
  _remerge(pipe, state)
  state.base.clear()


__all__ = ['ATTENTION_TARGETS', 'CONV_TARGETS', 'COMPONENT_PREFIXES', 'LAYOUTS', 'LoraWeight',
           'METADATA_KEY', 'WEIGHT_NAME', 'delete_adapter', 'flatten', 'get_adapters', 'init_lora',
           'load_lora_weights', 'lora_file', 'lora_from_state', 'lora_state', 'merge',
           'merge_many', 'num_parameters', 'read_lora', 'read_metadata', 'save_lora',
           'set_lora_scale', 'unload_lora_weights', 'unmerge']
