"""A run's outputs: metrics.jsonl, TensorBoard events, PNG grids and .npz, on any filesystem.

Every file is written through ``etils.epath``, so a workdir may be a local directory or any path
epath supports (``gs://bucket/run`` included). Object stores cannot append to an object (GCS
objects are immutable; gcsfs silently overwrites in mode 'a'), so a file that grows
(``metrics.jsonl``, an event file) is appended to on a local filesystem and rewritten whole from
memory elsewhere (``_GrowingFile``).

TensorBoard event files are written here, not by tensorboardX's ``SummaryWriter`` (which opens
local paths itself): the ``Event`` / ``Summary`` protos of ``tensorboardX.proto`` in TFRecord
framing (``uint64 length, uint32 masked_crc32c(length), data, uint32 masked_crc32c(data)``,
little-endian), the format TensorBoard's event-file loader reads.

Only process 0 writes (``enabled``); the other processes get writers that do nothing, so the
trainer calls them unconditionally.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import socket
import struct
import time
from typing import Any, Mapping

import numpy as np
from etils import epath
from PIL import Image

_event_files = itertools.count()


def _is_local(path: epath.Path) -> bool:
  return '://' not in str(path)


class _GrowingFile:
  """A file that only grows by appends, written through epath on any filesystem.

  Locally each ``append`` opens the file in mode 'ab'. On an object store the content is kept in
  memory and each ``append`` rewrites the whole object (the objects here stay small: one row or
  a few events per logged step). ``keep_existing`` starts from the content already there (a
  resumed run continues its metrics.jsonl); otherwise the file starts empty.
  """

  def __init__(self, path: epath.Path, *, keep_existing: bool):
    self.path = path
    self._local = _is_local(path)
    self._content = None
    if not self._local:
      self._content = path.read_bytes() if keep_existing and path.exists() else b''
    elif not keep_existing:
      path.write_bytes(b'')

  def append(self, data: bytes) -> None:
    if not data:
      return
    if self._local:
      with self.path.open('ab') as f:
        f.write(data)
    else:
      self._content += data
      self.path.write_bytes(self._content)


def _masked_crc32c(data: bytes) -> int:
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
  return record_writer.masked_crc32c(data)


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: ``length, masked_crc32c(length), data, masked_crc32c(data)`` (little-endian)."""
  header = struct.pack('<Q', len(data))
  return (header + struct.pack('<I', _masked_crc32c(header)) + data
          + struct.pack('<I', _masked_crc32c(data)))


class EventWriter:
  """Writes one TensorBoard event file ``logdir/events.out.tfevents.<time>.<host>.<n>``.

  Events are buffered and written by ``flush``. The first record is the ``brain.Event:2`` file
  version, as TensorFlow's and tensorboardX's writers start theirs.
  """

  def __init__(self, logdir: epath.PathLike):
    from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
    self._event_pb2 = event_pb2
    logdir = epath.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    # Host and a per-process counter: two writers never share a file (or overwrite each other's
    # on an object store), even within one second.
    name = (f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.'
            f'{next(_event_files)}')
    self._file = _GrowingFile(logdir / name, keep_existing=False)
    self._pending = []
    self._add(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))
    self.flush()

  @property
  def path(self) -> epath.Path:
    return self._file.path

  def _add(self, event) -> None:
    self._pending.append(tfrecord(event.SerializeToString()))

  def add_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Queues one ``simple_value`` summary per scalar, all at ``step``."""
    from tensorboardX import summary  # pylint: disable=import-outside-toplevel
    for tag, value in scalars.items():
      self._add(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                      summary=summary.scalar(tag, float(value))))

  def add_text(self, tag: str, text: str, step: int = 0) -> None:
    """Queues a text summary (TensorBoard's text plugin; shown under ``tag/text_summary``)."""
    from tensorboardX import summary  # pylint: disable=import-outside-toplevel
    self._add(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                    summary=summary.text(tag, text)))

  def flush(self) -> None:
    self._file.append(b''.join(self._pending))
    self._pending = []

  def close(self) -> None:
    self.flush()


class MetricWriter:
  """Appends one JSON object per logged step to ``workdir/metrics.jsonl`` and to TensorBoard.

  ``metrics.jsonl`` continues across restarts of a run; each writer starts a new event file in
  ``workdir/tensorboard``.
  """

  def __init__(self, workdir: epath.PathLike, *, enabled: bool = True):
    self.enabled = enabled
    self._metrics = self._tb = None
    if enabled:
      workdir = epath.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._metrics = _GrowingFile(workdir / 'metrics.jsonl', keep_existing=True)
      self._tb = EventWriter(workdir / 'tensorboard')

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: _to_python(v) for k, v in metrics.items()})
    self._metrics.append((json.dumps(row) + '\n').encode('utf-8'))
    self._tb.add_scalars(step, {k: v for k, v in row.items()
                                if k != 'step' and isinstance(v, (int, float))})
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
  """Tiles ``images: [N, H, W, C]`` in [-1, 1] into one uint8 grid.

  The grid is ``[rows * (H + pad) + pad, cols * (W + pad) + pad, C]``, ``cols = ceil(sqrt(N))``
  unless ``ncols`` is given; the padding is black.
  """
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


def save_image_grid(path: epath.PathLike, images: np.ndarray, *, upscale: int = 1) -> None:
  """Writes a PNG grid of ``images: [N, H, W, C]`` in [-1, 1]; small images are upscaled."""
  grid = image_grid(images)
  mode = 'L' if grid.shape[-1] == 1 else 'RGB'
  img = Image.fromarray(grid[..., 0] if mode == 'L' else grid, mode=mode)
  if upscale > 1:
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
  buf = io.BytesIO()
  img.save(buf, format='PNG')
  _write_bytes(path, buf.getvalue())


def save_npz(path: epath.PathLike, **arrays: np.ndarray) -> None:
  """Writes ``arrays`` as one uncompressed ``.npz`` (``np.savez``), read back by ``np.load``."""
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  _write_bytes(path, buf.getvalue())


def _write_bytes(path: epath.PathLike, data: bytes) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)
