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
  * ``digits_text``: the captioned digits of text-to-image training (no download):
    scikit-learn's digits at 32x32, one digit (``'the digit seven'``) or two side by
    side (``'the digits three and seven'``), with the ten pairs of `held_out_pairs`
    never in training (see `digits_text_examples`).

Image-text pairs (batches gain ``'text'``, a NumPy str array [batch]):
  * ``folder`` with ``captions='txt'``: ``a.png`` is captioned by ``a.txt`` beside it
    (UTF-8, surrounding whitespace stripped; an empty file is the empty caption, the
    unconditional prompt; a missing one is an error naming the image);
  * ``folder`` with ``captions='metadata'``: ``metadata.jsonl`` or ``metadata.csv``
    files (Hugging Face ``imagefolder``: a ``file_name`` column relative to the
    metadata file's directory, and the caption column ``text_key``, default ``text``);
  * ``array`` with ``text_key``: a str array [N] of the .npz under that key;
  * ``tfds`` with ``text_key``: that text feature of the data set (``a/b`` reaches
    into nested features; of a sequence of captions, the first).

Images come out as float32 [H, W, C] in [-1, 1]. Every random choice (order, flips)
is a function of the seed and the example's position, so a pipeline restored from
`DataPipeline.iterator.get_state()` continues with exactly the batches the original
would have produced.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import pathlib
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags
from absl import logging
from PIL import Image, ImageOps

SOURCES = ('digits', 'folder', 'array', 'tfds', 'digits_text')
# Caption layouts of the folder source ('' or None: images only).
CAPTIONS = ('txt', 'metadata')
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
      ``'x'``: float32 [batch, *element_shape]; with labels, ``'label'``:
      int32 [batch]; with captions, ``'text'``: str [batch] (a NumPy unicode
      array). Checkpoint it with `get_state()` / `set_state()` or with orbax
      through `grain.checkpoint.CheckpointHandler`.
    element_shape: Shape of one example, e.g. (32, 32, 3) or (D,).
    num_examples: Examples in the whole split, over all processes, before
      corrupt files are dropped.
    num_classes: Number of classes when labels were requested, else None.
    has_text: Whether batches carry ``'text'``.
  """

  iterator: grain.DatasetIterator
  element_shape: tuple[int, ...]
  num_examples: int
  num_classes: int | None
  has_text: bool = False
  _captions: Callable[[], list[str]] | None = dataclasses.field(default=None, repr=False)

  def captions(self) -> list[str]:
    """Returns the caption of every example of the split, in source index order.

    For building a vocabulary (`text_vocab.build_vocab`). Reads every caption
    file (``captions='txt'``) or every record (``tfds``) once.

    Raises:
      ValueError: If the pipeline has no captions, or a caption cannot be read.
    """
    if self._captions is None:
      raise ValueError('This data has no captions: use source digits_text, a folder '
                       "with captions='txt' or 'metadata', or text_key= for array/tfds.")
    return self._captions()

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
    captions: str | None = None,
    text_key: str | None = None,
) -> DataPipeline:
  """Builds the input pipeline of one process.

  Args:
    source: One of `SOURCES`.
    path: Directory (``folder``) or .npy/.npz file (``array``).
    name: TFDS data set name, e.g. ``'cifar10'`` (``tfds``).
    split: TFDS split, e.g. ``'train'`` or ``'train[:90%]'`` (``tfds``); one of
      `DIGITS_TEXT_SPLITS` (``digits_text``).
    data_dir: TFDS data directory; None uses TFDS's default (``tfds``).
    image_size: Side of the square output images. None keeps the native size
      (``digits``: 8, ``tfds``: the data set's, ``digits_text``: 32, the only
      size it has); required for ``folder``. For ``array`` it must match the
      stored size (arrays are not resized).
    num_channels: 1 (grayscale) or 3 (RGB) for image sources.
    batch_size: Examples per batch of this process (global batch divided by
      `process_count`).
    seed: Non-negative seed of the shuffle order and the flips.
    shuffle: Whether to shuffle (reshuffled every epoch).
    num_epochs: Passes over the data; None repeats forever.
    random_flip: Flip images horizontally with probability 1/2 (images only;
      not ``digits_text``, whose captions say which digit is on the left).
    use_labels: Whether batches carry ``'label'``.
    process_index: Index of this process; it reads slice `process_index` of
      every global batch of ``batch_size * process_count`` examples.
    process_count: Number of processes. The global batches do not depend on it
      (a last, incomplete global batch of a finite stream is dropped).
    worker_count: Decoding processes; 0 decodes in threads of this process.
    background: RGB, 0..255 each, that transparent pixels are composited onto
      (see `load_image`).
    captions: ``folder`` only: None (or '') for images only, ``'txt'`` (a
      same-name .txt beside each image) or ``'metadata'`` (metadata.jsonl /
      metadata.csv files, Hugging Face imagefolder).
    text_key: Caption field: the .npz key (``array``) or text feature (``tfds``)
      whose presence turns captions on; the caption column of
      ``captions='metadata'`` (None: ``'text'``). Not used by other sources.

  Returns:
    The `DataPipeline`.

  Raises:
    ValueError: On an unknown source, invalid arguments, or a missing, empty or
      malformed data set (the message says which and how to fix it).
    FileNotFoundError: A caption file missing for an image, or an image named
      in a metadata file missing (both named).
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
  captions = captions or None
  text_key = text_key or None
  if captions is not None:
    if source != 'folder':
      raise ValueError(
          f"captions={captions!r} is for the folder source; the {source} source "
          + ('has its captions built in.' if source == 'digits_text' else
             'reads captions from text_key=.' if source in ('array', 'tfds') else
             'has no captions.'))
    if captions not in CAPTIONS:
      raise ValueError(f'captions must be one of {CAPTIONS} (or empty for images '
                       f'only), got {captions!r}.')
  if text_key is not None and (source in ('digits', 'digits_text') or (
      source == 'folder' and captions != 'metadata')):
    raise ValueError(
        f'text_key={text_key!r} names the caption field of the array and tfds '
        f"sources and of folder captions='metadata'; the {source} source "
        + ('has its captions built in.' if source == 'digits_text' else
           "needs captions='metadata' for it." if source == 'folder' else
           'has no captions.'))

  if source == 'digits':
    spec = _digits_source(image_size=image_size, num_channels=num_channels,
                          use_labels=use_labels)
  elif source == 'digits_text':
    if random_flip:
      raise ValueError(
          'random_flip would swap the left and right digits of digits_text images '
          "('the digits three and seven' would show seven and three, mirrored). "
          'Set random_flip=False.')
    spec = _digits_text_source(split=split, image_size=image_size,
                               num_channels=num_channels, use_labels=use_labels)
  elif source == 'folder':
    spec = _folder_source(path=path, image_size=image_size,
                          num_channels=num_channels, use_labels=use_labels,
                          background=background, captions=captions,
                          text_key=text_key)
  elif source == 'array':
    spec = _array_source(path=path, image_size=image_size,
                         num_channels=num_channels, use_labels=use_labels,
                         text_key=text_key)
  else:
    spec = _tfds_source(name=name, split=split, data_dir=data_dir,
                        image_size=image_size, num_channels=num_channels,
                        use_labels=use_labels, background=background,
                        text_key=text_key)

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
      has_text=spec.captions is not None,
      _captions=spec.captions,
  )


def array_header(path: str, *, text_key: str | None = None
                 ) -> tuple[tuple[int, ...], np.dtype] | None:
  """Shape and dtype of the data array that the ``array`` source reads from `path`.

  Read from the file's header only (an .npz member's header through its zip
  entry), so checking a config costs nothing for large files. The array is the
  one `create_dataset` takes: a .npy file's, or an .npz's ``'x'`` (else its one
  array besides labels and `text_key`).

  Returns:
    ``(shape, dtype)``, or None when `path` is not a readable .npy / .npz file
    or does not say which array holds the data (`create_dataset` names the
    problem).
  """
  try:
    if pathlib.Path(path).suffix.lower() == '.npy':
      x = np.load(path, mmap_mode='r')
      return tuple(x.shape), x.dtype
    with zipfile.ZipFile(path) as npz:
      keys = [n[:-len('.npy')] for n in npz.namelist() if n.endswith('.npy')]
      data_keys = [k for k in keys if k not in _ARRAY_LABEL_KEYS + (text_key,)]
      key = 'x' if 'x' in keys else data_keys[0] if len(data_keys) == 1 else None
      if key is None:
        return None
      with npz.open(f'{key}.npy') as f:
        read = (np.lib.format.read_array_header_1_0
                if np.lib.format.read_magic(f) == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(f)
      return tuple(shape), np.dtype(dtype)
  except (OSError, ValueError, zipfile.BadZipFile):
    return None


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
# The captioned digits (data.source='digits_text'), issue 18's embedded
# text-to-image data.

DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven',
               'eight', 'nine')
DIGITS_TEXT_SIZE = 32
# scikit-learn's digits (the 1797 test examples of UCI optdigits, 13 writers) carry
# no writer ids; they come form by form, so a contiguous index range stands in for
# held-out writers: indices 1500..1796 (297 digits, 27 to 33 of each class) are
# never in 'train'.
DIGITS_HELD_OUT_WRITERS = range(1500, 1797)
# Pair examples per single-digit example in 'train' and 'test'.
DIGITS_TEXT_PAIRS_PER_SINGLE = 3
DIGITS_TEXT_SPLITS = ('train', 'test', 'test_singles', 'test_seen_pairs',
                      'test_heldout_pairs')
_DIGITS_TEXT_SEED = 18  # fixes the drawn pairs: the data set is one fixed list


def held_out_pairs() -> list[tuple[int, int]]:
  """The ten (left, right) digit pairs never shown in training: (a, (a + 5) mod 10).

  Both orders of each unordered pair {a, a + 5} are in the list, so no training
  image shows those two digits together.
  """
  return [(a, (a + 5) % 10) for a in range(10)]


def seen_pairs() -> list[tuple[int, int]]:
  """The 90 (left, right) pairs of training, equal digits included."""
  held_out = set(held_out_pairs())
  return [(a, b) for a in range(10) for b in range(10) if (a, b) not in held_out]


def digits_caption(left: int, right: int | None = None) -> str:
  """``'the digit seven'`` for one digit, ``'the digits three and seven'`` for two.

  Raises:
    ValueError: If a digit is not in 0..9.
  """
  for d in (left,) if right is None else (left, right):
    if not isinstance(d, (int, np.integer)) or not 0 <= d <= 9:
      raise ValueError(f'Digits are integers 0..9, got {d!r}.')
  if right is None:
    return f'the digit {DIGIT_WORDS[left]}'
  return f'the digits {DIGIT_WORDS[left]} and {DIGIT_WORDS[right]}'


@dataclasses.dataclass(frozen=True)
class DigitsText:
  """All examples of one split of the captioned digits, in source index order.

  Attributes:
    images: float32 [N, 32, 32, 1] in [-1, 1] (black -1, ink 1).
    captions: N captions (`digits_caption`).
    digits: int32 [N, 2]: (left, right) digit; (digit, -1) for a single digit.
    indices: int32 [N, 2]: the scikit-learn ``load_digits`` examples drawn
      (left, right); right is -1 for a single digit.
  """

  images: np.ndarray
  captions: list[str]
  digits: np.ndarray
  indices: np.ndarray


def digits_text_examples(split: str = 'train') -> DigitsText:
  """The captioned digits of issue 18 as arrays (the ``digits_text`` source's data).

  Two kinds of 32x32 grayscale image, made from scikit-learn's 8x8 digits
  (values 0..16 -> [-1, 1], resized bilinearly):

  * one digit resized to fill the image, captioned ``'the digit seven'``;
  * two digits, each resized to 16x16, the first in columns 0-15 and the second
    in columns 16-31, both in rows 8-23, black elsewhere, captioned
    ``'the digits three and seven'`` (left, then right).

  Writers: ``'train'`` draws its digits from indices outside
  `DIGITS_HELD_OUT_WRITERS`, every other split only from inside it.

  Mix and pairs: a split of n digits (1500 for 'train', 297 for the others) has
  examples 0..n-1 = each digit alone, then, in 'train' and 'test', 3n pair
  examples (`DIGITS_TEXT_PAIRS_PER_SINGLE`; 25% singles, 75% pairs): pair
  example r * n + j (round r = 0, 1, 2) puts digit j on the left and on the right
  a digit drawn uniformly among the split's digits of a class drawn uniformly
  among the 9 classes b with (a, b) not in `held_out_pairs` (a: the left class;
  equal digits allowed). The draws come from a fixed seed, so the examples are
  one fixed list; a pipeline's seed only orders them. The splits:

  * ``'train'``: singles and seen pairs of the training writers (6000);
  * ``'test'``: the same construction from the held-out writers (1188);
  * ``'test_singles'``: its singles (297); ``'test_seen_pairs'``: its pairs (891);
  * ``'test_heldout_pairs'``: each held-out digit j on the left with, on the
    right, a held-out writer's digit of class (a + 5) mod 10 (297).

  Args:
    split: One of `DIGITS_TEXT_SPLITS`.

  Returns:
    The `DigitsText` of the split.

  Raises:
    ValueError: On an unknown split.
  """
  left, right = _digits_text_table(split)
  big, small, labels = _digits_text_images()
  records = _DigitsTextRecords(left=left, right=right, num_channels=1)
  images = np.stack([records.image(i) for i in range(len(left))])
  digits = np.stack([labels[left], np.where(right < 0, -1, labels[right])], axis=1)
  return DigitsText(images=images, captions=list(records.captions),
                    digits=digits.astype(np.int32),
                    indices=np.stack([left, right], axis=1).astype(np.int32))


@functools.lru_cache(maxsize=1)
def _digits_text_images() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """All digits at 32x32 and at 16x16 (float32, [-1, 1]) and their labels."""
  big, labels = load_digits_images(DIGITS_TEXT_SIZE)
  small, _ = load_digits_images(DIGITS_TEXT_SIZE // 2)
  for a in (big, small, labels):
    a.flags.writeable = False  # shared by every caller
  return big, small, labels


@functools.lru_cache(maxsize=None)
def _digits_text_table(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(left, right) scikit-learn indices of every example of `split`; right -1: single."""
  if split not in DIGITS_TEXT_SPLITS:
    raise ValueError(f'Unknown digits_text split {split!r}; expected one of '
                     f'{DIGITS_TEXT_SPLITS}.')
  _, _, labels = _digits_text_images()
  held_out = np.zeros(len(labels), bool)
  held_out[DIGITS_HELD_OUT_WRITERS.start:DIGITS_HELD_OUT_WRITERS.stop] = True
  pool = np.flatnonzero(~held_out if split == 'train' else held_out)
  by_class = [pool[labels[pool] == c] for c in range(10)]

  def pairs(kind: int, rounds: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([_DIGITS_TEXT_SEED, int(split == 'train'), kind])
    left = np.tile(pool, rounds)
    a = labels[left]
    if kind == 0:  # seen: b uniform over the 9 classes with (a, b) seen
      k = rng.integers(0, 9, size=len(left))
      # Skip the held-out partner (a + 5) % 10: k, or k + 1 from it on.
      b = np.where(k >= (a + 5) % 10, k + 1, k)
    else:
      b = (a + 5) % 10
    counts = np.array([len(c) for c in by_class])
    pick = (rng.random(len(left)) * counts[b]).astype(np.int64)
    right = np.array([by_class[c][i] for c, i in zip(b, pick)], np.int64)
    return left, right

  singles = (pool, np.full(len(pool), -1, np.int64))
  if split == 'test_singles':
    parts = [singles]
  elif split == 'test_heldout_pairs':
    parts = [pairs(1, 1)]
  elif split == 'test_seen_pairs':
    parts = [pairs(0, DIGITS_TEXT_PAIRS_PER_SINGLE)]
  else:
    parts = [singles, pairs(0, DIGITS_TEXT_PAIRS_PER_SINGLE)]
  left = np.concatenate([p[0] for p in parts]).astype(np.int64)
  right = np.concatenate([p[1] for p in parts]).astype(np.int64)
  left.flags.writeable = right.flags.writeable = False
  return left, right


class _DigitsTextRecords:
  """Random-access captioned digits: {'x': float32 [32, 32, C], 'text': str}."""

  def __init__(self, *, left: np.ndarray, right: np.ndarray, num_channels: int):
    self._left = left
    self._right = right
    self._num_channels = num_channels
    _, _, labels = _digits_text_images()
    self.captions = tuple(
        digits_caption(int(labels[l])) if r < 0 else
        digits_caption(int(labels[l]), int(labels[r]))
        for l, r in zip(left, right))

  def __len__(self) -> int:
    return len(self._left)

  def image(self, index: int) -> np.ndarray:
    big, small, _ = _digits_text_images()
    left, right = int(self._left[index]), int(self._right[index])
    if right < 0:
      x = big[left].copy()
    else:
      half = DIGITS_TEXT_SIZE // 2
      top = (DIGITS_TEXT_SIZE - half) // 2  # rows 8..23
      x = np.full((DIGITS_TEXT_SIZE, DIGITS_TEXT_SIZE, 1), -1.0, np.float32)
      x[top:top + half, :half] = small[left]
      x[top:top + half, half:] = small[right]
    if self._num_channels == 3:
      x = np.repeat(x, 3, axis=-1)
    return x

  def __getitem__(self, index: int) -> Element:
    return {'x': self.image(index), 'text': np.str_(self.captions[index])}


def _digits_text_source(*, split: str, image_size: int | None, num_channels: int,
                        use_labels: bool) -> _SourceSpec:
  _check_num_channels(num_channels)
  if image_size not in (None, DIGITS_TEXT_SIZE):
    raise ValueError(f'digits_text images are {DIGITS_TEXT_SIZE}x{DIGITS_TEXT_SIZE}; '
                     f'got image_size={image_size}. Set image_size to '
                     f'{DIGITS_TEXT_SIZE}.')
  if use_labels:
    raise ValueError(
        'digits_text examples are captioned, not labeled (one image may show two '
        'digits); set use_labels=False. digits_text_examples(split).digits gives '
        'the digits of every example.')
  left, right = _digits_text_table(split)
  records = _DigitsTextRecords(left=left, right=right, num_channels=num_channels)
  return _SourceSpec(records=records, decode=_identity,
                     element_shape=(DIGITS_TEXT_SIZE, DIGITS_TEXT_SIZE, num_channels),
                     num_examples=len(records), num_classes=None,
                     captions=functools.partial(list, records.captions))


# ----------------------------------------------------------------------------
# Sources: each one gives random-access records and a per-record decode.


@dataclasses.dataclass(frozen=True)
class _SourceSpec:
  records: Sequence[Any]  # random access; decoded lazily by `decode`
  decode: Callable[[Any], Element | None]  # None marks a corrupt record
  element_shape: tuple[int, ...]
  num_examples: int
  num_classes: int | None
  # All captions in source index order (read on demand); None: no text.
  captions: Callable[[], list[str]] | None = None


class _ArrayRecords:
  """Random-access examples from arrays: {'x': float32, 'label': int32, 'text': str}.

  A .npy file is memory-mapped and reopened after pickling (worker processes),
  so large arrays are neither loaded whole nor copied to every worker. Arrays
  from an .npz (which cannot be memory-mapped) are held in memory.
  """

  def __init__(self, *, x: np.ndarray | None = None, labels: np.ndarray | None,
               npy_path: str | None = None, scale_uint8: bool,
               texts: np.ndarray | None = None):
    self._x = x
    self._npy_path = npy_path
    self._labels = labels
    self._scale_uint8 = scale_uint8
    self._texts = texts

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
    if self._texts is not None:
      element['text'] = np.str_(self._texts[index])
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
                   background: tuple[int, int, int], captions: str | None = None,
                   text_key: str | None = None) -> _SourceSpec:
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
  texts = [None] * len(files)
  all_captions = None
  if captions == 'txt':
    texts = _caption_files(root, files)
    all_captions = functools.partial(_read_captions, texts)
  elif captions == 'metadata':
    texts = _metadata_captions(root, relative, text_key=text_key or 'text')
    all_captions = functools.partial(list, texts)
  records = [(str(f), label, text) for f, label, text in zip(files, labels, texts)]
  decode = functools.partial(_decode_image_file, image_size=image_size,
                             num_channels=num_channels, use_labels=use_labels,
                             background=background)
  return _SourceSpec(records=records, decode=decode,
                     element_shape=(image_size, image_size, num_channels),
                     num_examples=len(records),
                     num_classes=len(classes) if classes else None,
                     captions=all_captions)


@dataclasses.dataclass(frozen=True)
class _CaptionFile:
  """A caption still on disk: read when its example is decoded."""
  path: str


def _caption_files(root: pathlib.Path, files: Sequence[pathlib.Path]
                   ) -> list[_CaptionFile]:
  """The same-name .txt of every image; FileNotFoundError naming those without."""
  # One listing, not a stat per image (slow on network file systems).
  existing = {f for f in root.rglob('*') if f.suffix == '.txt'}
  missing = [f for f in files if f.with_suffix('.txt') not in existing]
  if missing:
    names = ', '.join(f'{f.relative_to(root)} (no {f.with_suffix(".txt").name})'
                      for f in missing[:5])
    more = f' and {len(missing) - 5} more' if len(missing) > 5 else ''
    raise FileNotFoundError(
        f"captions='txt' reads a same-name .txt file beside each image, but "
        f'{len(missing)} image(s) of {root} have none: {names}{more}. Add the caption '
        "files (an empty file is the empty caption), or use captions='' for images "
        'only.')
  return [_CaptionFile(str(f.with_suffix('.txt'))) for f in files]


def _read_caption_file(path: str) -> str:
  # utf-8-sig: a byte-order mark (Windows editors) is not part of the caption.
  with open(path, encoding='utf-8-sig') as f:
    return f.read().strip()


def _read_captions(texts: Sequence[_CaptionFile]) -> list[str]:
  captions = []
  for t in texts:
    try:
      captions.append(_read_caption_file(t.path))
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f'Cannot read caption file {t.path}: {e}') from e
  return captions


_METADATA_FILES = ('metadata.jsonl', 'metadata.csv')


def _metadata_captions(root: pathlib.Path, relative: Sequence[pathlib.Path], *,
                       text_key: str) -> list[str]:
  """Captions of the images (paths relative to root) from imagefolder metadata.

  Follows Hugging Face ``datasets``' imagefolder: each ``metadata.jsonl`` (one JSON
  object per line) or ``metadata.csv`` (with a header row) holds ``file_name``, relative
  to its own directory, and the caption column.
  """
  metadata_files = sorted(
      (f for f in root.rglob('*') if f.name in _METADATA_FILES and f.is_file()),
      key=lambda f: f.relative_to(root).as_posix())
  if not metadata_files:
    raise ValueError(
        f"captions='metadata' needs a metadata.jsonl or metadata.csv file in {root} "
        f"(Hugging Face imagefolder: columns file_name and {text_key}); found none.")
  by_dir = {}
  for f in metadata_files:
    if f.parent in by_dir:
      raise ValueError(f'{f.parent} holds both metadata.jsonl and metadata.csv; keep one.')
    by_dir[f.parent] = f
  text_of: dict[str, str] = {}
  where: dict[str, str] = {}
  for f in metadata_files:
    for line, row in _metadata_rows(f):
      name = row.get('file_name')
      if not isinstance(name, str) or not name:
        raise ValueError(f'{f}, line {line}: no file_name (the image path relative to '
                         f'{f.parent}); the row is {row}.')
      if text_key not in row:
        raise ValueError(f'{f}, line {line}: no {text_key!r} column (the caption; set '
                         f'text_key= to the column that holds it); the row is {row}.')
      text = row[text_key]
      if text is None:  # JSON null, an empty CSV cell: the empty caption
        text = ''
      if not isinstance(text, str):
        raise ValueError(f'{f}, line {line}: the caption {text_key!r} must be a '
                         f'string, got {text!r}.')
      key = (f.parent / name).relative_to(root).as_posix()
      if key in text_of:
        raise ValueError(f'{key} has two captions: {where[key]} and {f}, line {line}.')
      text_of[key] = text.strip()
      where[key] = f'{f}, line {line}'
  images = {r.as_posix() for r in relative}
  unknown = sorted(set(text_of) - images)
  if unknown:
    raise FileNotFoundError(
        f'{len(unknown)} file_name(s) of the metadata are not images of {root} '
        f'({", ".join(IMAGE_EXTENSIONS)}): {", ".join(unknown[:5])} '
        f'(named in {where[unknown[0]]}).')
  uncaptioned = [r.as_posix() for r in relative if r.as_posix() not in text_of]
  if uncaptioned:
    raise ValueError(
        f'{len(uncaptioned)} image(s) of {root} have no row in the metadata files '
        f'({", ".join(str(f) for f in metadata_files[:3])}): '
        f'{", ".join(uncaptioned[:5])}. Add rows (an empty {text_key} is the empty '
        'caption) or remove the images.')
  return [text_of[r.as_posix()] for r in relative]


def _metadata_rows(path: pathlib.Path):
  """(line number, row dict) of a metadata.jsonl or metadata.csv."""
  if path.suffix == '.jsonl':
    with open(path, encoding='utf-8-sig') as f:
      for line, text in enumerate(f, start=1):
        if not text.strip():
          continue
        try:
          row = json.loads(text)
        except json.JSONDecodeError as e:
          raise ValueError(f'{path}, line {line}: not JSON ({e}).') from e
        if not isinstance(row, dict):
          raise ValueError(f'{path}, line {line}: expected a JSON object, got {row!r}.')
        yield line, row
  else:
    with open(path, encoding='utf-8-sig', newline='') as f:
      reader = csv.DictReader(f)
      for row in reader:
        yield reader.line_num, row


def _array_source(*, path: str | None, image_size: int | None,
                  num_channels: int, use_labels: bool,
                  text_key: str | None = None) -> _SourceSpec:
  if path is None or not os.path.isfile(path):
    raise ValueError(f'The array source needs path= a .npy or .npz file; got '
                     f'{path!r}, which is not a file.')
  suffix = pathlib.Path(path).suffix.lower()
  labels = None
  texts = None
  npy_path = None
  if suffix == '.npy':
    x = np.load(path, mmap_mode='r')
    npy_path = path
    if use_labels:
      raise ValueError(
          f'use_labels=True but {path} is a .npy file, which holds no labels. '
          f"Save an .npz with 'x' and 'label' arrays instead.")
    if text_key is not None:
      raise ValueError(
          f'text_key={text_key!r} but {path} is a .npy file, which holds no '
          f"captions. Save an .npz with 'x' and a str array {text_key!r} instead.")
  elif suffix == '.npz':
    with np.load(path) as npz:
      keys = list(npz.files)
      if text_key is not None:
        texts = _npz_texts(npz, text_key, path=path)
      data_keys = [k for k in keys if k not in _ARRAY_LABEL_KEYS + (text_key,)]
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
  if texts is not None and texts.shape != (len(x),):
    raise ValueError(
        f'The captions {text_key!r} of {path} have shape {texts.shape}; expected '
        f'[{len(x)}], one per example.')
  records = _ArrayRecords(x=None if npy_path else x, npy_path=npy_path,
                          labels=labels, scale_uint8=scale_uint8, texts=texts)
  return _SourceSpec(records=records, decode=_identity,
                     element_shape=x.shape[1:], num_examples=len(x),
                     num_classes=num_classes,
                     captions=None if texts is None else texts.tolist)


def _npz_texts(npz, text_key: str, *, path: str) -> np.ndarray:
  """The str array [N] under `text_key` of an open .npz (bytes decoded as UTF-8)."""
  if text_key not in npz.files:
    raise ValueError(f'text_key={text_key!r} is not an array of {path}; its keys '
                     f'are {list(npz.files)}.')
  try:
    texts = npz[text_key]
  except ValueError as e:  # object arrays need pickle, which is never used
    raise ValueError(
        f'{path}[{text_key!r}] is an object array, which only unpickling could '
        'read. Save the captions as a fixed-width str array: '
        'np.savez(..., text=np.array(captions, dtype=str)).') from e
  if texts.dtype.kind == 'S':
    try:
      texts = np.char.decode(texts, 'utf-8')
    except UnicodeDecodeError as e:
      raise ValueError(f'{path}[{text_key!r}] holds bytes that are not UTF-8: {e}') from e
  if texts.dtype.kind != 'U':
    raise ValueError(f'{path}[{text_key!r}] has dtype {texts.dtype}; expected str '
                     '(unicode or UTF-8 bytes), one caption per example.')
  return texts


def _tfds_source(*, name: str | None, split: str, data_dir: str | None,
                 image_size: int | None, num_channels: int,
                 use_labels: bool, background: tuple[int, int, int],
                 text_key: str | None = None) -> _SourceSpec:
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
  text_path = None
  all_captions = None
  if text_key is not None:
    text_path = tuple(text_key.split('/'))
    feature = features
    for i, part in enumerate(text_path):
      keys = list(feature.keys()) if hasattr(feature, 'keys') else []
      if part not in keys:
        raise ValueError(
            f'TFDS data set {name!r} has no text feature {text_key!r}: '
            f'{"/".join(text_path[:i]) or "the top level"} has {keys}. Set text_key '
            "to the caption feature ('a/b' for a nested one).")
      feature = feature[part]
      # A Sequence of dicts (e.g. COCO's captions/text) is indexed through its feature.
      feature = getattr(feature, 'feature', feature)
    all_captions = functools.partial(_tfds_captions, records, text_path)
  element_shape = ((image_size, image_size, num_channels) if image_size
                   else (height, width, num_channels))
  decode = functools.partial(_decode_tfds_example, image_size=image_size,
                             num_channels=num_channels, use_labels=use_labels,
                             background=background, text_path=text_path)
  return _SourceSpec(records=records, decode=decode, element_shape=element_shape,
                     num_examples=len(records), num_classes=num_classes,
                     captions=all_captions)


def _tfds_text(example: dict[str, Any], text_path: tuple[str, ...]) -> str:
  """The caption at `text_path` of a decoded TFDS example (the first of a sequence)."""
  value = example
  for part in text_path:
    value = value[part]
  while isinstance(value, (list, tuple, np.ndarray)) and np.ndim(value) > 0:
    if len(value) == 0:
      return ''
    value = value[0]
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    value = value.decode('utf-8')
  if not isinstance(value, str):
    raise ValueError(f'TFDS feature {"/".join(text_path)} holds {type(value).__name__}, '
                     'not text.')
  return value.strip()


def _tfds_captions(records, text_path: tuple[str, ...]) -> list[str]:
  return [_tfds_text(records[i], text_path) for i in range(len(records))]


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


def _decode_image_file(record: tuple[str, int, str | _CaptionFile | None], *,
                       image_size: int, num_channels: int, use_labels: bool,
                       background: tuple[int, int, int]) -> Element | None:
  """Reads one image file (and caption); returns None (and logs) if unreadable."""
  filename, label, text = record
  try:
    x = load_image(filename, image_size=image_size, num_channels=num_channels,
                   background=background)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    # OSError covers unidentified and truncated files.
    logging.warning('Skipping unreadable image %s: %s', filename, e)
    return None
  if isinstance(text, _CaptionFile):
    try:
      text = _read_caption_file(text.path)
    except (OSError, UnicodeDecodeError) as e:
      logging.warning('Skipping %s: unreadable caption file %s: %s', filename,
                      text.path, e)
      return None
  element = {'x': _uint8_image_to_float(x)}
  if use_labels:
    element['label'] = np.int32(label)
  if text is not None:
    element['text'] = np.str_(text)
  return element


def _decode_tfds_example(example: dict[str, Any], *, image_size: int | None,
                         num_channels: int, use_labels: bool,
                         background: tuple[int, int, int],
                         text_path: tuple[str, ...] | None = None) -> Element:
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
  if text_path is not None:
    element['text'] = np.str_(_tfds_text(example, text_path))
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
