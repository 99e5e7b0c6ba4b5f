"""Grain input pipelines over the data sources the trainer supports.

One entry point, `create_dataset`, turns a source into a deterministic, sharded,
checkpointable stream of host-local batches:

    global index space -> shuffle(seed) -> repeat -> decode (lazy, per example,
    `load_image`; an unreadable file is replaced by the next readable example)
    -> random flip -> batch slices -> [process_index::process_count]
    -> [worker processes]

The stream is global: every process sees the same shuffled positions and takes
slice `process_index` of every global batch, so the global batches, and the
iterator state (counted in global batches), are the same whatever the number of
processes and devices; a checkpoint of 2 processes resumes on 1 and vice versa.

Sources (`SOURCES`):
  * ``digits``: scikit-learn's bundled 8x8 digits (no download).
  * ``folder``: a directory tree of .png/.jpg/.jpeg/.webp/.tif/.tiff/.bmp files,
    decoded by `load_image`.
  * ``array``: a .npy or .npz file of shape [N, ...].
  * ``tfds``: any prepared TFDS image data set, read through `tfds.data_source`
    (random access over ArrayRecord files; TensorFlow is not needed).

Images come out as float32 [H, W, C] in [-1, 1]. Every random choice (order, flips)
is a function of the seed and the example's position, so a pipeline restored from
`DataPipeline.iterator.get_state()` continues with exactly the batches the original
would have produced.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags
from absl import logging
from PIL import Image, ImageOps

SOURCES = ('digits', 'folder', 'array', 'tfds')
# TIFF: the usual container of 16-bit, 32-bit integer and float images.
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.tif', '.tiff', '.bmp')

# Key of the per-batch count of dropped examples that travels from the
# (possibly multiprocess) decoding stage to the main-process counter.
_SKIPPED_KEY = '_num_skipped'
_ARRAY_LABEL_KEYS = ('label', 'y')

Element = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DataPipeline:
  """A batched input pipeline and what the trainer needs to know about it.

  Attributes:
    iterator: grain `DatasetIterator` yielding dicts of NumPy arrays:
      ``'x'``: float32 [batch, *element_shape] and, with labels, ``'label'``:
      int32 [batch]. Checkpoint it with `get_state()` / `set_state()` or with
      orbax through `grain.checkpoint.CheckpointHandler`.
    element_shape: Shape of one example, e.g. (32, 32, 3) or (D,).
    num_examples: Examples in the whole split, over all processes, before
      corrupt files are dropped.
    num_classes: Number of classes when labels were requested, else None.
  """

  iterator: grain.DatasetIterator
  element_shape: tuple[int, ...]
  num_examples: int
  num_classes: int | None

  def num_skipped(self) -> int:
    """Returns how many distinct unreadable files this process has met so far.

    A file unreadable in every epoch counts once. The indices are part of the
    iterator state, so they survive checkpointing; `add_skipped` merges the
    other processes' (the trainer does so before it logs or saves).
    """
    return self.iterator.num_skipped

  def skipped(self) -> list[int]:
    """Returns the source indices of the distinct unreadable files met so far."""
    return sorted(self.iterator.skipped)

  def add_skipped(self, indices: Sequence[int]) -> None:
    """Adds source indices of unreadable files met elsewhere (other processes)."""
    self.iterator.add_skipped(indices)


# ----------------------------------------------------------------------------
# Public API.


def create_dataset(
    *,
    source: str,
    path: str | None = None,
    name: str | None = None,
    split: str = 'train',
    data_dir: str | None = None,
    image_size: int | None = None,
    num_channels: int = 3,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    random_flip: bool = False,
    use_labels: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    background: Sequence[int] = (255, 255, 255),
) -> DataPipeline:
  """Builds the input pipeline of one process.

  Args:
    source: One of `SOURCES`.
    path: Directory (``folder``) or .npy/.npz file (``array``).
    name: TFDS data set name, e.g. ``'cifar10'`` (``tfds``).
    split: TFDS split, e.g. ``'train'`` or ``'train[:90%]'`` (``tfds``).
    data_dir: TFDS data directory; None uses TFDS's default (``tfds``).
    image_size: Side of the square output images. None keeps the native size
      (``digits``: 8, ``tfds``: the data set's); required for ``folder``. For
      ``array`` it must match the stored size (arrays are not resized).
    num_channels: 1 (grayscale) or 3 (RGB) for image sources.
    batch_size: Examples per batch of this process (global batch divided by
      `process_count`).
    seed: Non-negative seed of the shuffle order and the flips.
    shuffle: Whether to shuffle (reshuffled every epoch).
    num_epochs: Passes over the data; None repeats forever.
    random_flip: Flip images horizontally with probability 1/2 (images only).
    use_labels: Whether batches carry ``'label'``.
    process_index: Index of this process; it reads slice `process_index` of
      every global batch of ``batch_size * process_count`` examples.
    process_count: Number of processes. The global batches do not depend on it
      (a last, incomplete global batch of a finite stream is dropped).
    worker_count: Decoding processes; 0 decodes in threads of this process.
    background: RGB, 0..255 each, that transparent pixels are composited onto
      (see `load_image`).

  Returns:
    The `DataPipeline`.

  Raises:
    ValueError: On an unknown source, invalid arguments, or a missing, empty or
      malformed data set (the message says which and how to fix it).
  """
  if source not in SOURCES:
    raise ValueError(f'Unknown data source {source!r}; expected one of {SOURCES}.')
  _check_positive_int('batch_size', batch_size)
  _check_positive_int('process_count', process_count)
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative integer, got {seed!r}.')
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index must be in [0, {process_count}), got {process_index}.')
  if num_epochs is not None:
    _check_positive_int('num_epochs', num_epochs)
  if worker_count < 0:
    raise ValueError(f'worker_count must be >= 0, got {worker_count}.')
  if image_size is not None:
    _check_positive_int('image_size', image_size)
  background = _check_background(background)

  if source == 'digits':
    spec = _digits_source(image_size=image_size, num_channels=num_channels,
                          use_labels=use_labels)
  elif source == 'folder':
    spec = _folder_source(path=path, image_size=image_size,
                          num_channels=num_channels, use_labels=use_labels,
                          background=background)
  elif source == 'array':
    spec = _array_source(path=path, image_size=image_size,
                         num_channels=num_channels, use_labels=use_labels)
  else:
    spec = _tfds_source(name=name, split=split, data_dir=data_dir,
                        image_size=image_size, num_channels=num_channels,
                        use_labels=use_labels, background=background)

  if random_flip and len(spec.element_shape) != 3:
    raise ValueError(
        f'random_flip needs images [H, W, C]; this {source} data has examples of '
        f'shape {spec.element_shape}. Set random_flip=False.')

  global_batch = batch_size * process_count
  if num_epochs is not None and spec.num_examples * num_epochs < global_batch:
    raise ValueError(
        f'The global batch of {global_batch} examples ({process_count} process(es) x '
        f'batch_size={batch_size}) exceeds the {spec.num_examples * num_epochs} '
        f'examples of {num_epochs} epoch(s); no full batch can be made.')

  # Distinct, decorrelated seeds for order and flips, the same on every process:
  # the stream below is global. ([seed, 0] keeps one process's order as it was.)
  shuffle_seed, flip_seed = (
      int(s) for s in np.random.SeedSequence([int(seed), 0]).generate_state(2))

  # One global stream of examples, defined over the global index space: position
  # i of it is the same example (and flip) whatever the number of processes.
  ds = grain.MapDataset.range(spec.num_examples)
  if shuffle:
    ds = ds.shuffle(seed=shuffle_seed)
  # After shuffle so that each epoch gets its own order.
  ds = ds.repeat(num_epochs)
  ds = _ReadableAt(ds, records=spec.records, decode=spec.decode,
                   max_tries=2 * spec.num_examples)
  if random_flip:
    ds = ds.random_map(_random_flip, seed=flip_seed)
  # Global batch k is the process_count slices k * process_count + p of size
  # batch_size; process p takes slice p of every global batch, so the global
  # batches (and the iterator state, counted in global batches) do not depend
  # on the topology.
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_stack)
  ds = ds[:len(ds) // process_count * process_count][process_index::process_count]
  it_ds = ds.to_iter_dataset()
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():
      # Grain's worker processes read absl flags and fail outside an absl app
      # (notebooks, pytest); defaults are what such callers want
      # (google/grain issues #1355, #1360).
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count))
  it_ds = _CountSkippedIterDataset(it_ds)

  return DataPipeline(
      iterator=iter(it_ds),
      element_shape=tuple(int(d) for d in spec.element_shape),
      num_examples=spec.num_examples,
      num_classes=spec.num_classes if use_labels else None,
  )


def load_digits_images(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Loads scikit-learn's 8x8 digits as images in [-1, 1].

  Args:
    image_size: Output side; 8 keeps the native resolution, other sizes are
      resized bilinearly.

  Returns:
    images: float32 [N, image_size, image_size, 1] in [-1, 1], N = 1797.
    labels: int32 [N] in 0..9.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  _check_positive_int('image_size', image_size)
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # 0..16 -> [-1, 1]
  if image_size != images.shape[1]:
    # float32 arrays become mode 'F' images: resized without 8-bit rounding.
    images = np.stack([
        np.asarray(Image.fromarray(im).resize(
            (image_size, image_size), Image.Resampling.BILINEAR))
        for im in images
    ])
    images = np.clip(images, -1.0, 1.0)
  return images[..., None].astype(np.float32), digits.target.astype(np.int32)


# ----------------------------------------------------------------------------
# Sources: each one gives random-access records and a per-record decode.


@dataclasses.dataclass(frozen=True)
class _SourceSpec:
  records: Sequence[Any]  # random access; decoded lazily by `decode`
  decode: Callable[[Any], Element | None]  # None marks a corrupt record
  element_shape: tuple[int, ...]
  num_examples: int
  num_classes: int | None


class _ArrayRecords:
  """Random-access examples from arrays: {'x': float32, 'label': int32}.

  A .npy file is memory-mapped and reopened after pickling (worker processes),
  so large arrays are neither loaded whole nor copied to every worker. Arrays
  from an .npz (which cannot be memory-mapped) are held in memory.
  """

  def __init__(self, *, x: np.ndarray | None = None, labels: np.ndarray | None,
               npy_path: str | None = None, scale_uint8: bool):
    self._x = x
    self._npy_path = npy_path
    self._labels = labels
    self._scale_uint8 = scale_uint8

  def __getstate__(self):
    state = dict(self.__dict__)
    if self._npy_path is not None:
      state['_x'] = None
    return state

  @property
  def x(self) -> np.ndarray:
    if self._x is None:
      self._x = np.load(self._npy_path, mmap_mode='r')
    return self._x

  def __len__(self) -> int:
    return len(self.x)

  def __getitem__(self, index: int) -> Element:
    x = np.asarray(self.x[index])
    x = (x.astype(np.float32) / 127.5 - 1.0 if self._scale_uint8
         else x.astype(np.float32))
    element = {'x': x}
    if self._labels is not None:
      element['label'] = np.int32(self._labels[index])
    return element


def _digits_source(*, image_size: int | None, num_channels: int,
                   use_labels: bool) -> _SourceSpec:
  _check_num_channels(num_channels)
  image_size = image_size or 8
  images, labels = load_digits_images(image_size)
  if num_channels == 3:
    images = np.repeat(images, 3, axis=-1)
  records = _ArrayRecords(x=images, labels=labels if use_labels else None,
                          scale_uint8=False)
  return _SourceSpec(records=records, decode=_identity,
                     element_shape=images.shape[1:], num_examples=len(images),
                     num_classes=10)


def _folder_source(*, path: str | None, image_size: int | None,
                   num_channels: int, use_labels: bool,
                   background: tuple[int, int, int]) -> _SourceSpec:
  files = _list_image_files(path)
  if image_size is None:
    raise ValueError(
        'The folder source needs image_size: images of different sizes are '
        'center-cropped and resized to one square size.')
  _check_num_channels(num_channels)
  root = pathlib.Path(path)
  relative = [f.relative_to(root) for f in files]
  labels = [0] * len(files)
  classes = None
  if use_labels:
    top_level = [r for r in relative if len(r.parts) == 1]
    if top_level:
      raise ValueError(
          f'use_labels=True takes labels from the first-level subdirectories of '
          f'{path}, but {len(top_level)} image(s) lie directly in it, e.g. '
          f'{top_level[0]}. Move them into class directories or set '
          'use_labels=False.')
    classes = sorted({r.parts[0] for r in relative})
    class_index = {c: i for i, c in enumerate(classes)}
    labels = [class_index[r.parts[0]] for r in relative]
  records = [(str(f), label) for f, label in zip(files, labels)]
  decode = functools.partial(_decode_image_file, image_size=image_size,
                             num_channels=num_channels, use_labels=use_labels,
                             background=background)
  return _SourceSpec(records=records, decode=decode,
                     element_shape=(image_size, image_size, num_channels),
                     num_examples=len(records),
                     num_classes=len(classes) if classes else None)


def _array_source(*, path: str | None, image_size: int | None,
                  num_channels: int, use_labels: bool) -> _SourceSpec:
  if path is None or not os.path.isfile(path):
    raise ValueError(f'The array source needs path= a .npy or .npz file; got '
                     f'{path!r}, which is not a file.')
  suffix = pathlib.Path(path).suffix.lower()
  labels = None
  npy_path = None
  if suffix == '.npy':
    x = np.load(path, mmap_mode='r')
    npy_path = path
    if use_labels:
      raise ValueError(
          f'use_labels=True but {path} is a .npy file, which holds no labels. '
          f"Save an .npz with 'x' and 'label' arrays instead.")
  elif suffix == '.npz':
    with np.load(path) as npz:
      keys = list(npz.files)
      data_keys = [k for k in keys if k not in _ARRAY_LABEL_KEYS]
      if 'x' in keys:
        data_key = 'x'
      elif len(data_keys) == 1:
        data_key = data_keys[0]
      else:
        raise ValueError(
            f"Cannot tell which array of {path} holds the data: expected key 'x' "
            f'or a single array besides {_ARRAY_LABEL_KEYS}; found keys {keys}.')
      x = npz[data_key]
      label_key = next((k for k in _ARRAY_LABEL_KEYS if k in keys), None)
      if use_labels:
        if label_key is None:
          raise ValueError(
              f'use_labels=True but {path} has no label array; expected one of '
              f'the keys {_ARRAY_LABEL_KEYS}, found {keys}.')
        labels = np.asarray(npz[label_key])
  else:
    raise ValueError(f'The array source reads .npy or .npz files; got {path}.')

  if x.ndim < 2:
    raise ValueError(
        f'{path} holds an array of shape {x.shape}; expected [N, ...] with one '
        'example per row: [N, D] for vectors or [N, H, W, C] for images.')
  if x.dtype == np.uint8:
    scale_uint8 = True
  elif np.issubdtype(x.dtype, np.floating):
    scale_uint8 = False
  else:
    raise ValueError(
        f'{path} holds dtype {x.dtype}; expected uint8 (scaled to [-1, 1]) or a '
        'float type (used as is).')
  if x.ndim == 4:
    height, width, channels = x.shape[1:]
    if image_size is not None and (height, width) != (image_size, image_size):
      raise ValueError(
          f'{path} holds {height}x{width} images but image_size={image_size}; '
          'arrays are not resized. Set image_size to None or resize the file.')
    if channels != num_channels:
      raise ValueError(
          f'{path} holds images with {channels} channel(s) [N, H, W, C] = '
          f'{x.shape} but num_channels={num_channels}.')
  num_classes = None
  if labels is not None:
    if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(
          f'Labels in {path} must be integers of shape [{len(x)}]; got '
          f'{labels.dtype} {labels.shape}.')
    if labels.min() < 0:
      raise ValueError(f'Labels in {path} must be >= 0; found {labels.min()}.')
    num_classes = int(labels.max()) + 1
    labels = labels.astype(np.int32)
  records = _ArrayRecords(x=None if npy_path else x, npy_path=npy_path,
                          labels=labels, scale_uint8=scale_uint8)
  return _SourceSpec(records=records, decode=_identity,
                     element_shape=x.shape[1:], num_examples=len(x),
                     num_classes=num_classes)


def _tfds_source(*, name: str | None, split: str, data_dir: str | None,
                 image_size: int | None, num_channels: int,
                 use_labels: bool, background: tuple[int, int, int]) -> _SourceSpec:
  if not name:
    raise ValueError("The tfds source needs name=, e.g. name='cifar10'.")
  _check_num_channels(num_channels)
  # Imported here: TFDS is slow to import, only this source needs it, and it is an optional extra.
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError("data.source='tfds' needs tensorflow-datasets, an optional extra: "
                     "pip install 'diffusion_jax[tfds]'") from e

  try:
    # download=False: a training job must not start a download on its own.
    records = tfds.data_source(name, split=split, data_dir=data_dir,
                               download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise
  except (RuntimeError, AssertionError, OSError) as e:
    where = data_dir or '~/tensorflow_datasets (or $TFDS_DATA_DIR)'
    raise ValueError(
        f'TFDS data set {name!r} is not prepared for random access in {where}. '
        'Prepare it in the ArrayRecord format on a machine with internet access, '
        f'then copy it there: `tfds build {name} --data_dir={data_dir or "DIR"} '
        '--file_format=array_record`, or in Python '
        f'`tfds.builder({name!r}, data_dir={data_dir!r}, '
        "file_format='array_record').download_and_prepare()`. "
        f'Original error: {e}') from e

  features = records.dataset_info.features
  if 'image' not in features:
    raise ValueError(f"TFDS data set {name!r} has no 'image' feature; its "
                     f'features are {list(features.keys())}.')
  height, width, _ = features['image'].shape
  if image_size is None and (height is None or width is None):
    raise ValueError(f'TFDS data set {name!r} has images of varying size; set '
                     'image_size.')
  num_classes = None
  if use_labels:
    if 'label' not in features:
      raise ValueError(f"use_labels=True but TFDS data set {name!r} has no "
                       f"'label' feature; its features are "
                       f'{list(features.keys())}.')
    num_classes = features['label'].num_classes
  element_shape = ((image_size, image_size, num_channels) if image_size
                   else (height, width, num_channels))
  decode = functools.partial(_decode_tfds_example, image_size=image_size,
                             num_channels=num_channels, use_labels=use_labels,
                             background=background)
  return _SourceSpec(records=records, decode=decode, element_shape=element_shape,
                     num_examples=len(records), num_classes=num_classes)


# ----------------------------------------------------------------------------
# Per-example work (runs lazily, possibly in worker processes).


def _identity(element: Element) -> Element:
  return element


def _list_image_files(path: str | None) -> list[pathlib.Path]:
  """All image files under `path`, recursively, in a deterministic order."""
  accepted = ', '.join(IMAGE_EXTENSIONS)
  if path is None or not os.path.isdir(path):
    raise ValueError(f'Image folder {path!r} does not exist or is not a directory '
                     f'(expected a tree of {accepted} files).')
  root = pathlib.Path(path)
  files = [f for f in root.rglob('*')
           if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
  if not files:
    raise ValueError(f'Image folder {path} contains no images with the accepted '
                     f'extensions ({accepted}, any case, searched recursively).')
  # Sorted by relative path (not by os.walk order, which depends on the file
  # system) so that every host and every run sees the same indices.
  return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def load_image(path: str | os.PathLike[str], *, image_size: int, num_channels: int,
               background: Sequence[int] = (255, 255, 255)) -> np.ndarray:
  """Decodes an image file as the trainer sees it (every image source uses this).

  The rules, in order:

  * EXIF orientation is applied.
  * Transparency (RGBA, LA, PA, a palette or an RGB/L image with a transparent
    color) is composited onto `background`: ``round(a * c + (1 - a) * bg)`` per
    channel with ``a = alpha / 255``.
  * High bit depths are scaled to 8 bits by their range, never clipped:
    16-bit (``I;16*``) as ``round(v / 257)``; 32-bit integers (``I``) the same
    when every value lies in [0, 65535] (Pillow opens some 16-bit files as
    ``I``), otherwise the image's min..max onto 0..255; 32-bit floats (``F``)
    as ``round(255 v)`` when every value lies in [0, 1], otherwise the image's
    min..max onto 0..255 (a constant image maps to 0).
  * CMYK, YCbCr, 1-bit and every other mode are converted by Pillow; one
    channel is the ITU-R 601-2 luma of RGB.
  * The largest centered square is cut out and resized (bicubic, antialiased
    when shrinking) to `image_size`.

  Args:
    path: An image file Pillow reads (.png, .jpg, .jpeg, .webp, ...).
    image_size: Side of the square output.
    num_channels: 1 (grayscale) or 3 (RGB).
    background: RGB, 0..255 each, that transparent pixels are composited onto
      (config field ``data.background``).

  Returns:
    uint8 [image_size, image_size, num_channels].

  Raises:
    ValueError: On invalid arguments.
    OSError, SyntaxError, Image.DecompressionBombError: When the file cannot be
      decoded (the pipelines skip such files, name them in a warning and count
      them).
  """
  _check_positive_int('image_size', image_size)
  _check_num_channels(num_channels)
  background = _check_background(background)
  with Image.open(path) as image:
    if image.format == 'JPEG':
      # JPEG can decode at 1/2, 1/4 or 1/8 scale, never below the requested
      # size: far less work for large photos.
      image.draft('RGB' if num_channels == 3 else 'L', (image_size, image_size))
    image = ImageOps.exif_transpose(image)
    image.load()  # forces the full decode inside the `with`
    image = _to_8bit(image, background=background, num_channels=num_channels)
  return _center_crop_resize(image, image_size).reshape(
      image_size, image_size, num_channels)


def _to_8bit(image: Image.Image, *, background: tuple[int, int, int],
             num_channels: int) -> Image.Image:
  """An 'RGB' or 'L' image of 8-bit values by the rules of `load_image`."""
  mode = 'RGB' if num_channels == 3 else 'L'
  if image.mode.startswith('I;16') or image.mode in ('I', 'F'):
    x = np.asarray(image).astype(np.float64)
    if image.mode.startswith('I;16') or (
        image.mode == 'I' and x.min() >= 0 and x.max() <= 65535):
      x = x / 257.0
    elif image.mode == 'F' and x.min() >= 0.0 and x.max() <= 1.0:
      x = x * 255.0
    else:
      low, high = x.min(), x.max()
      x = (x - low) * (255.0 / (high - low)) if high > low else np.zeros_like(x)
    # floor(x + 1/2): halves round up, not to even.
    gray = Image.fromarray(np.floor(x + 0.5).clip(0, 255).astype(np.uint8), 'L')
    return gray.convert(mode)
  has_alpha = (image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La')
               or 'transparency' in image.info)
  if not has_alpha:
    return image.convert(mode)
  rgba = np.asarray(image.convert('RGBA')).astype(np.float64)
  alpha = rgba[..., 3:] / 255.0
  rgb = alpha * rgba[..., :3] + (1.0 - alpha) * np.asarray(background, np.float64)
  rgb = Image.fromarray(np.floor(rgb + 0.5).clip(0, 255).astype(np.uint8), 'RGB')
  return rgb.convert(mode)


def _decode_image_file(record: tuple[str, int], *, image_size: int,
                       num_channels: int, use_labels: bool,
                       background: tuple[int, int, int]) -> Element | None:
  """Reads one image file; returns None (and logs) if it is unreadable."""
  filename, label = record
  try:
    x = load_image(filename, image_size=image_size, num_channels=num_channels,
                   background=background)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    # OSError covers unidentified and truncated files.
    logging.warning('Skipping unreadable image %s: %s', filename, e)
    return None
  element = {'x': _uint8_image_to_float(x)}
  if use_labels:
    element['label'] = np.int32(label)
  return element


def _decode_tfds_example(example: dict[str, Any], *, image_size: int | None,
                         num_channels: int, use_labels: bool,
                         background: tuple[int, int, int]) -> Element:
  image = np.asarray(example['image'])  # uint8 [H, W, C]
  height, width, channels = image.shape
  if channels != num_channels or (
      image_size is not None and (height, width) != (image_size, image_size)):
    # The rules of `load_image` (an RGBA data set is composited, not cut).
    pil = _to_8bit(Image.fromarray(image[..., 0] if channels == 1 else image),
                   background=background, num_channels=num_channels)
    image = (_center_crop_resize(pil, image_size) if image_size
             else np.asarray(pil))
  element = {'x': _uint8_image_to_float(image)}
  if use_labels:
    element['label'] = np.int32(example['label'])
  return element


def _center_crop_resize(image: Image.Image, image_size: int) -> np.ndarray:
  """Largest centered square of `image`, resized: uint8 [S, S] or [S, S, C]."""
  width, height = image.size
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  # Crop first: resize(box=...) would let the filter reach pixels outside the
  # square. PIL's BICUBIC resize is antialiased when it shrinks.
  image = image.crop((left, top, left + side, top + side))
  image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
  return np.asarray(image)


def _uint8_image_to_float(image: np.ndarray) -> np.ndarray:
  if image.ndim == 2:
    image = image[..., None]
  return image.astype(np.float32) / 127.5 - 1.0


def _random_flip(element: Element, rng: np.random.Generator) -> Element:
  if rng.random() < 0.5:
    element = dict(element, x=np.ascontiguousarray(element['x'][:, ::-1]))
  return element


# ----------------------------------------------------------------------------
# Skipping unreadable examples without changing the global order.


class _ReadableAt(grain.MapDataset):
  """Decodes the example at each position of a stream of source indices.

  An unreadable example is replaced by the next readable one of the stream (a
  function of the position only, so the same on every topology); the source
  indices of the unreadable ones ride along under `_SKIPPED_KEY`, since this
  stage may run in a worker process and the count must reach the main one.
  """

  def __init__(self, parent: grain.MapDataset, *, records: Sequence[Any],
               decode: Callable[[Any], Element | None], max_tries: int):
    super().__init__(parent)
    self._records = records
    self._decode = decode
    self._max_tries = max_tries

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    skipped = []
    for offset in range(self._max_tries):
      source_index = int(self._parent[(index + offset) % len(self)])
      element = self._decode(self._records[source_index])
      if element is not None:
        return dict(element, **{_SKIPPED_KEY: tuple(skipped)})
      skipped.append(source_index)
    # Without this, data of only unreadable files would loop forever.
    raise ValueError(
        f'{self._max_tries} examples in a row could not be read: every file of the '
        'data set seems unreadable (see the warnings logged above).')


def _stack(elements: Sequence[Element]) -> Element:
  batch = {key: np.stack([e[key] for e in elements])
           for key in elements[0] if key != _SKIPPED_KEY}
  batch[_SKIPPED_KEY] = np.array(
      [i for e in elements for i in e[_SKIPPED_KEY]], np.int64)
  return batch


class _CountSkippedIterDataset(grain.IterDataset):
  """Removes the skipped indices from the batches and keeps the distinct ones."""

  def __iter__(self) -> grain.DatasetIterator:
    return _CountSkippedIterator(self._parent.__iter__())


class _CountSkippedIterator(grain.DatasetIterator):
  """The pipeline's outer iterator; its state includes the skipped files.

  Attributes:
    skipped: source indices of the distinct unreadable examples met so far (by
      this process, plus any merged in with `add_skipped`).
  """

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self.skipped: set[int] = set()

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  def add_skipped(self, indices: Sequence[int]) -> None:
    self.skipped.update(int(i) for i in indices)

  def __next__(self) -> Element:
    batch = dict(next(self._parent))
    self.skipped.update(int(i) for i in batch.pop(_SKIPPED_KEY))
    return batch

  def get_state(self) -> dict[str, Any]:
    return {'pipeline': self._parent.get_state(),
            'skipped': sorted(self.skipped)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['pipeline'])
    self.skipped = {int(i) for i in state.get('skipped', ())}


# ----------------------------------------------------------------------------
# Argument checks.


def _check_positive_int(name: str, value: Any) -> None:
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'{name} must be a positive integer, got {value!r}.')


def _check_background(background: Sequence[int]) -> tuple[int, int, int]:
  values = tuple(background) if isinstance(background, (tuple, list)) else ()
  if len(values) != 3 or not all(
      isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in values):
    raise ValueError(
        f'background must be 3 integers in 0..255 (R, G, B), got {background!r}.')
  return tuple(int(v) for v in values)


def _check_num_channels(num_channels: int) -> None:
  if num_channels not in (1, 3):
    raise ValueError(
        f'num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}.')
