"""A run's outputs: metrics.jsonl, TensorBoard events, and PNG grids of images.

Only process 0 writes (``jax.process_index() == 0``); the other processes get writers that do
nothing, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np
from PIL import Image


class MetricWriter:
  """Appends one JSON object per logged step to ``workdir/metrics.jsonl`` and to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._path = os.path.join(workdir, 'metrics.jsonl')
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(logdir=os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: _to_python(v) for k, v in metrics.items()})
    with open(self._path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(row) + '\n')
    for k, v in row.items():
      if k != 'step' and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def write_text(self, tag: str, text: str) -> None:
    if self.enabled:
      self._tb.add_text(tag, text, 0)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _to_python(v: Any) -> Any:
  v = np.asarray(v)
  if v.ndim == 0:
    return v.item()
  return v.tolist()


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 [0, 255] (clipped)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, *, ncols: int | None = None, pad: int = 1) -> np.ndarray:
  """Tiles ``images: [N, H, W, C]`` in [-1, 1] into one uint8 ``[rows*(H+pad), cols*(W+pad), C]``."""
  images = to_uint8(images)
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
    grid[y0:y0 + h, x0:x0 + w] = images[i]
  return grid


def save_image_grid(path: str, images: np.ndarray, *, upscale: int = 1) -> None:
  """Writes a PNG grid of ``images: [N, H, W, C]`` in [-1, 1]; small images are upscaled."""
  grid = image_grid(images)
  mode = 'L' if grid.shape[-1] == 1 else 'RGB'
  img = Image.fromarray(grid[..., 0] if mode == 'L' else grid, mode=mode)
  if upscale > 1:
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  img.save(path)
