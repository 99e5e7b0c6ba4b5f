"""Tests of diffusion_jax.input_pipeline: sources, order, sharding, resuming."""

import json
import logging
import sys
from unittest import mock

import grain
import numpy as np
import pytest
from PIL import Image
from sklearn import datasets

from diffusion_jax import input_pipeline


def _take(pipeline, n):
  return [next(pipeline.iterator) for _ in range(n)]


def _all_batches(pipeline):
  return list(pipeline.iterator)


def _ids(batches):
  """Example ids of `_id_array` data, batch by batch."""
  return [b['x'][:, 0].astype(int).tolist() for b in batches]


def _id_array(tmp_path, n, *, labels=False):
  """A float [n, 2] .npz whose row i is (i, -i): rows identify examples."""
  x = np.stack([np.arange(n), -np.arange(n)], axis=1).astype(np.float32)
  arrays = {'x': x}
  if labels:
    arrays['label'] = np.arange(n) % 3
  path = tmp_path / 'ids.npz'
  np.savez(path, **arrays)
  return str(path)


def _save(path, size, color, mode='RGB', fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new(mode, size, color).save(path, format=fmt)


@pytest.fixture
def image_folder(tmp_path):
  """4 readable images in nested class dirs, 2 corrupt ones, 1 non-image."""
  root = tmp_path / 'images'
  _save(root / 'cat' / 'a.png', (20, 12), (255, 0, 0))
  _save(root / 'cat' / 'nested' / 'deeper' / 'b.JPG', (9, 15), (0, 255, 0),
        fmt='JPEG')
  _save(root / 'dog' / 'c.jpeg', (16, 16), 128, mode='L', fmt='JPEG')
  _save(root / 'dog' / 'd.webp', (10, 10), (0, 0, 255, 255), mode='RGBA',
        fmt='WEBP')
  (root / 'dog' / 'corrupt.png').write_bytes(b'definitely not a png')
  _save(root / 'dog' / 'full.png', (32, 32), (1, 2, 3))
  data = (root / 'dog' / 'full.png').read_bytes()
  (root / 'dog' / 'full.png').unlink()
  (root / 'dog' / 'truncated.png').write_bytes(data[:len(data) // 2])
  (root / 'dog' / 'notes.txt').write_text('not an image')
  return root


# ---------------------------------------------------------------------------
# digits


@pytest.mark.parametrize('image_size,num_channels', [(None, 1), (16, 3)])
def test_digits_shapes_dtypes_range(image_size, num_channels):
  pipeline = input_pipeline.create_dataset(
      source='digits', image_size=image_size, num_channels=num_channels,
      batch_size=32, seed=0, use_labels=True)
  size = image_size or 8
  batch = next(pipeline.iterator)
  assert pipeline.element_shape == (size, size, num_channels)
  assert pipeline.num_examples == 1797
  assert pipeline.num_classes == 10
  assert batch['x'].shape == (32, size, size, num_channels)
  assert batch['x'].dtype == np.float32
  assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
  assert -1.0 <= batch['x'].min() and batch['x'].max() <= 1.0
  assert set(batch) == {'x', 'label'}


def test_load_digits_images_matches_sklearn():
  images, labels = input_pipeline.load_digits_images(8)
  reference = datasets.load_digits()
  np.testing.assert_allclose(images[..., 0], reference.images / 8.0 - 1.0,
                             atol=1e-6)
  np.testing.assert_array_equal(labels, reference.target)
  big, _ = input_pipeline.load_digits_images(32)
  assert big.shape == (1797, 32, 32, 1) and big.dtype == np.float32
  assert big.min() >= -1.0 and big.max() <= 1.0


def test_unknown_source_lists_sources():
  with pytest.raises(ValueError, match='digits.*folder.*array.*tfds'):
    input_pipeline.create_dataset(source='mnist', batch_size=2, seed=0)


# ---------------------------------------------------------------------------
# folder


def test_folder_rgb_labels_and_corrupt_files_skipped(image_folder, caplog):
  pipeline = input_pipeline.create_dataset(
      source='folder', path=str(image_folder), image_size=8, batch_size=2,
      seed=0, shuffle=False, num_epochs=1, use_labels=True)
  assert pipeline.num_examples == 6  # 4 readable + corrupt + truncated
  assert pipeline.num_classes == 2
  assert pipeline.element_shape == (8, 8, 3)
  with caplog.at_level(logging.WARNING):
    batches = _all_batches(pipeline)
  # An unreadable file is replaced by the next readable example of the stream
  # (the order is global, so nothing shifts): sorted relative paths cat/a,
  # cat/nested/deeper/b, dog/c, dog/corrupt -> dog/d, dog/d, dog/truncated ->
  # (wrapping round the finite stream) cat/a.
  assert [b['x'].shape for b in batches] == [(2, 8, 8, 3)] * 3
  assert pipeline.num_skipped() == 2
  assert 'corrupt.png' in caplog.text and 'truncated.png' in caplog.text
  x = np.concatenate([b['x'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  np.testing.assert_array_equal(labels, [0, 0, 1, 1, 1, 0])
  np.testing.assert_array_equal(x[3], x[4])
  np.testing.assert_array_equal(x[5], x[0])
  np.testing.assert_allclose(x[0, 4, 4], [1, -1, -1], atol=1e-6)  # red
  np.testing.assert_allclose(x[1, 4, 4], [-1, 1, -1], atol=0.03)  # JPEG green
  np.testing.assert_allclose(x[2, 4, 4], [0.004] * 3, atol=0.03)  # gray -> RGB
  np.testing.assert_allclose(x[3, 4, 4], [-1, -1, 1], atol=0.03)  # RGBA webp


def test_folder_grayscale_without_labels(image_folder):
  pipeline = input_pipeline.create_dataset(
      source='folder', path=str(image_folder), image_size=5, num_channels=1,
      batch_size=4, seed=0, num_epochs=1)
  (batch,) = _all_batches(pipeline)
  assert set(batch) == {'x'}
  assert batch['x'].shape == (4, 5, 5, 1) and batch['x'].dtype == np.float32
  assert pipeline.num_classes is None


def test_folder_center_crops_before_resizing(tmp_path):
  # Red | green | blue thirds of a wide image: the centered square is green.
  image = np.zeros((10, 30, 3), np.uint8)
  image[:, :10, 0] = image[:, 10:20, 1] = image[:, 20:, 2] = 255
  Image.fromarray(image).save(tmp_path / 'wide.png')
  pipeline = input_pipeline.create_dataset(
      source='folder', path=str(tmp_path), image_size=4, batch_size=1, seed=0)
  x = next(pipeline.iterator)['x'][0]
  np.testing.assert_allclose(x, np.broadcast_to([-1.0, 1.0, -1.0], x.shape),
                             atol=1e-6)


def test_folder_of_only_corrupt_files_raises_instead_of_looping(tmp_path):
  for i in range(3):
    (tmp_path / f'{i}.png').write_bytes(b'junk')
  pipeline = input_pipeline.create_dataset(
      source='folder', path=str(tmp_path), image_size=4, batch_size=2, seed=0)
  with pytest.raises(ValueError, match='unreadable'):
    next(pipeline.iterator)


@pytest.mark.parametrize('make', ['missing', 'empty', 'no_images'])
def test_folder_without_images_raises(tmp_path, make):
  path = tmp_path / 'data'
  if make != 'missing':
    path.mkdir()
  if make == 'no_images':
    (path / 'sub').mkdir()
    (path / 'sub' / 'readme.txt').write_text('hi')
  with pytest.raises(ValueError, match=r'(?s)data.*\.png, \.jpg, \.jpeg, \.webp'):
    input_pipeline.create_dataset(source='folder', path=str(path), image_size=8,
                                  batch_size=2, seed=0)


def test_folder_labels_need_class_dirs(tmp_path):
  _save(tmp_path / 'loose.png', (4, 4), (0, 0, 0))
  with pytest.raises(ValueError, match='loose.png'):
    input_pipeline.create_dataset(source='folder', path=str(tmp_path),
                                  image_size=4, batch_size=1, seed=0,
                                  use_labels=True)


# ---------------------------------------------------------------------------
# array


def test_array_header_reads_the_array_the_source_reads(tmp_path):
  np.savez(tmp_path / 'a.npz', x=np.zeros((5, 16, 16, 1), np.uint8), label=np.arange(5))
  np.savez(tmp_path / 'b.npz', data=np.zeros((5, 3), np.float32), y=np.arange(5),
           caption=np.array(['a'] * 5))
  np.save(tmp_path / 'c.npy', np.zeros((5, 3, 2), np.float16))
  np.savez(tmp_path / 'd.npz', a=np.zeros((2, 2)), b=np.zeros((2, 2)))  # which one is unclear
  (tmp_path / 'e.npz').write_bytes(b'not a zip')
  assert input_pipeline.array_header(str(tmp_path / 'a.npz')) == ((5, 16, 16, 1), np.uint8)
  assert input_pipeline.array_header(str(tmp_path / 'b.npz'), text_key='caption') == (
      (5, 3), np.float32)
  assert input_pipeline.array_header(str(tmp_path / 'c.npy')) == ((5, 3, 2), np.float16)
  for name in ('d.npz', 'e.npz', 'missing.npy'):
    assert input_pipeline.array_header(str(tmp_path / name)) is None
  # The shapes of what create_dataset then reads.
  for name, key in (('a.npz', None), ('b.npz', 'caption'), ('c.npy', None)):
    pipeline = input_pipeline.create_dataset(source='array', path=str(tmp_path / name),
                                             num_channels=1, batch_size=1, seed=0, text_key=key)
    assert pipeline.element_shape == input_pipeline.array_header(
        str(tmp_path / name), text_key=key)[0][1:]


def test_array_rank1_raises(tmp_path):
  path = tmp_path / 'vec.npy'
  np.save(path, np.zeros(10, np.float32))
  with pytest.raises(ValueError, match=r'vec\.npy.*\[N, \.\.\.\]'):
    input_pipeline.create_dataset(source='array', path=str(path), batch_size=2,
                                  seed=0)


def test_array_uint8_images_are_scaled(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), np.uint8)
  path = tmp_path / 'images.npy'
  np.save(path, images)
  pipeline = input_pipeline.create_dataset(
      source='array', path=str(path), batch_size=6, seed=0, shuffle=False,
      num_epochs=1)
  (batch,) = _all_batches(pipeline)
  assert pipeline.element_shape == (4, 4, 3)
  assert batch['x'].dtype == np.float32
  np.testing.assert_allclose(batch['x'], images / 127.5 - 1.0, atol=1e-6)


def test_array_npz_float_data_and_labels(tmp_path):
  path = _id_array(tmp_path, 9, labels=True)
  pipeline = input_pipeline.create_dataset(
      source='array', path=path, batch_size=3, seed=0, num_epochs=1,
      use_labels=True)
  batches = _all_batches(pipeline)
  assert pipeline.element_shape == (2,) and pipeline.num_classes == 3
  for batch in batches:
    ids = batch['x'][:, 0].astype(int)
    np.testing.assert_array_equal(batch['x'][:, 1], -ids)  # float: as stored
    np.testing.assert_array_equal(batch['label'], ids % 3)
    assert batch['label'].dtype == np.int32


def test_array_npz_errors(tmp_path):
  two = tmp_path / 'two.npz'
  np.savez(two, a=np.zeros((4, 2)), b=np.zeros((4, 2)))
  with pytest.raises(ValueError, match=r"\['a', 'b'\]"):
    input_pipeline.create_dataset(source='array', path=str(two), batch_size=2,
                                  seed=0)
  no_labels = tmp_path / 'nolabels.npz'
  np.savez(no_labels, x=np.zeros((4, 2), np.float32))
  with pytest.raises(ValueError, match='label'):
    input_pipeline.create_dataset(source='array', path=str(no_labels),
                                  batch_size=2, seed=0, use_labels=True)
  with pytest.raises(ValueError, match='random_flip'):
    input_pipeline.create_dataset(source='array', path=str(no_labels),
                                  batch_size=2, seed=0, random_flip=True)


# ---------------------------------------------------------------------------
# tfds


def test_tfds_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12):
    pipeline = input_pipeline.create_dataset(
        source='tfds', name='cifar10', image_size=16, batch_size=4, seed=0,
        num_epochs=1, use_labels=True, random_flip=True)
    batches = _all_batches(pipeline)
  assert pipeline.num_examples == 12 and pipeline.num_classes == 10
  assert pipeline.element_shape == (16, 16, 3)
  assert len(batches) == 3
  for batch in batches:
    assert batch['x'].shape == (4, 16, 16, 3) and batch['x'].dtype == np.float32
    assert batch['x'].min() >= -1.0 and batch['x'].max() <= 1.0
    assert batch['label'].dtype == np.int32
    assert ((0 <= batch['label']) & (batch['label'] < 10)).all()


def test_tfds_without_the_extra_says_how_to_install():
  with mock.patch.dict(sys.modules, {'tensorflow_datasets': None}):  # import fails as if absent
    with pytest.raises(ValueError,
                       match=r"data\.source='tfds'.*pip install 'diffusion_jax\[tfds\]'"):
      input_pipeline.create_dataset(source='tfds', name='cifar10', batch_size=2, seed=0)


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(ValueError, match=r'tfds build cifar10 --data_dir=.*'
                     r'download_and_prepare'):
    input_pipeline.create_dataset(source='tfds', name='cifar10',
                                  data_dir=str(tmp_path), batch_size=2, seed=0)


# ---------------------------------------------------------------------------
# Order, sharding, flips, resuming.


def test_order_is_determined_by_seed_and_reshuffled_per_epoch(tmp_path):
  path = _id_array(tmp_path, 10)

  def epochs(seed):
    pipeline = input_pipeline.create_dataset(
        source='array', path=path, batch_size=10, seed=seed, num_epochs=2)
    return _ids(_all_batches(pipeline))

  first, second = epochs(0)
  assert epochs(0) == [first, second]
  assert sorted(first) == sorted(second) == list(range(10))
  assert first != second  # each epoch has its own order
  assert epochs(1) != [first, second]


def _global_batches(process_count, global_batch=6, state=None, num=None, **kwargs):
  """The global batches of `process_count` processes: their slices joined."""
  per_process = []
  for index in range(process_count):
    pipeline = input_pipeline.create_dataset(
        batch_size=global_batch // process_count, process_index=index,
        process_count=process_count, **kwargs)
    if state is not None:
      pipeline.iterator.set_state(state)
    batches = (_all_batches(pipeline) if num is None
               else _take(pipeline, num))
    per_process.append((pipeline, batches))
  joined = [{k: np.concatenate([b[k] for b in group]) for k in group[0]}
            for group in zip(*(batches for _, batches in per_process))]
  return joined, [pipeline for pipeline, _ in per_process]


def _assert_same_batches(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for key in w:
      np.testing.assert_array_equal(g[key], w[key])


def test_global_batches_do_not_depend_on_the_process_count(tmp_path):
  path = _id_array(tmp_path, 13)
  kwargs = dict(source='array', path=path, seed=0, num_epochs=2)
  one, _ = _global_batches(1, **kwargs)
  # 26 examples in 2 epochs: 4 global batches of 6, the last 2 dropped.
  assert len(one) == 4
  first_epoch = sum(_ids(one[:2]), [])
  assert len(set(first_epoch)) == 12  # no repeats within an epoch
  for process_count in (2, 3, 6):
    _assert_same_batches(_global_batches(process_count, **kwargs)[0], one)


def test_unreadable_files_and_flips_do_not_depend_on_the_process_count(
    image_folder):
  kwargs = dict(source='folder', path=str(image_folder), image_size=4, seed=3,
                random_flip=True, use_labels=True)
  one, (single,) = _global_batches(1, global_batch=4, num=6, **kwargs)
  two, pipelines = _global_batches(2, global_batch=4, num=6, **kwargs)
  _assert_same_batches(two, one)
  assert single.num_skipped() == 2  # distinct files, not re-reads (6 epochs)
  union = set(pipelines[0].skipped()) | set(pipelines[1].skipped())
  assert union == set(single.skipped())
  pipelines[0].add_skipped(pipelines[1].skipped())
  assert pipelines[0].num_skipped() == 2


@pytest.mark.parametrize('saved_on,resumed_on', [(2, 1), (1, 2), (2, 3)])
def test_state_resumes_on_another_process_count(tmp_path, saved_on, resumed_on):
  kwargs = dict(source='array', path=_id_array(tmp_path, 20), seed=4)
  expected, _ = _global_batches(1, num=7, **kwargs)
  _, pipelines = _global_batches(saved_on, num=3, **kwargs)
  # What the checkpoint holds: process 0's state, as JSON.
  state = json.loads(json.dumps(pipelines[0].iterator.get_state()))
  resumed, _ = _global_batches(resumed_on, num=4, state=state, **kwargs)
  _assert_same_batches(resumed, expected[3:])


def test_random_flip_is_seeded_per_example():
  def first_batch(flip):
    return next(input_pipeline.create_dataset(
        source='digits', batch_size=64, seed=3, random_flip=flip,
        use_labels=True).iterator)

  plain, flipped, again = first_batch(False), first_batch(True), first_batch(True)
  np.testing.assert_array_equal(flipped['x'], again['x'])
  np.testing.assert_array_equal(plain['label'], flipped['label'])  # same order
  was_flipped = [
      np.array_equal(f, p[:, ::-1]) and not np.array_equal(f, p)
      for f, p in zip(flipped['x'], plain['x'])
  ]
  kept = [np.array_equal(f, p) for f, p in zip(flipped['x'], plain['x'])]
  assert all(a or b for a, b in zip(was_flipped, kept))
  assert 10 < sum(was_flipped) < 54


@pytest.mark.parametrize('source', ['digits', 'folder'])
def test_restored_state_resumes_the_same_batches(image_folder, source):
  kwargs = dict(source=source, batch_size=3, seed=7, random_flip=True,
                use_labels=True)
  if source == 'folder':
    kwargs.update(path=str(image_folder), image_size=4)
  original = input_pipeline.create_dataset(**kwargs)
  _take(original, 5)
  # The state must survive a round trip through JSON (what orbax writes).
  state = json.loads(json.dumps(original.iterator.get_state()))
  expected = _take(original, 4)

  restored = input_pipeline.create_dataset(**kwargs)
  restored.iterator.set_state(state)
  for got, want in zip(_take(restored, 4), expected):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert restored.num_skipped() == original.num_skipped()


def test_orbax_checkpoint_round_trip(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  kwargs = dict(source='digits', batch_size=8, seed=1, random_flip=True)
  original = input_pipeline.create_dataset(**kwargs)
  _take(original, 3)
  with ocp.CheckpointManager(
      tmp_path / 'ckpt',
      item_handlers={'data': grain.checkpoint.CheckpointHandler()}) as manager:
    manager.save(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(original.iterator)))
    manager.wait_until_finished()
    expected = _take(original, 2)
    restored = input_pipeline.create_dataset(**kwargs)
    manager.restore(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(restored.iterator)))
  for got, want in zip(_take(restored, 2), expected):
    np.testing.assert_array_equal(got['x'], want['x'])


def test_worker_processes_count_skips_and_resume(image_folder):
  # Spawning workers takes seconds, so one test covers pickling of the
  # pipeline, skip counts crossing processes, and resuming with workers.
  kwargs = dict(source='folder', path=str(image_folder), image_size=4,
                batch_size=2, seed=5, random_flip=True, use_labels=True,
                worker_count=2)
  original = input_pipeline.create_dataset(**kwargs)
  first = _take(original, 4)
  state = original.iterator.get_state()
  expected = _take(original, 2)
  assert all(b['x'].shape == (2, 4, 4, 3) for b in first + expected)
  # 6 batches = 2 epochs, with the same 2 corrupt files in each: counted once.
  assert original.num_skipped() == 2
  original.iterator.close()

  restored = input_pipeline.create_dataset(**kwargs)
  restored.iterator.set_state(state)
  for got, want in zip(_take(restored, 2), expected):
    np.testing.assert_array_equal(got['x'], want['x'])
    np.testing.assert_array_equal(got['label'], want['label'])
  restored.iterator.close()


# ---------------------------------------------------------------------------
# load_image: what the model sees.


def _load(path, num_channels=3, **kwargs):
  return input_pipeline.load_image(path, image_size=4, num_channels=num_channels,
                                   **kwargs)


def test_load_image_composites_rgba_onto_the_background(tmp_path):
  # Left half opaque blue; right half fully transparent over a hidden red.
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[:, :2] = [0, 0, 255, 255]
  rgba[:, 2:] = [255, 0, 0, 0]
  rgba[0, 0] = [0, 0, 255, 128]  # half-transparent blue over white
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'a.png')
  x = _load(tmp_path / 'a.png')
  assert x.dtype == np.uint8 and x.shape == (4, 4, 3)
  np.testing.assert_array_equal(x[1:, :2], np.broadcast_to([0, 0, 255], (3, 2, 3)))
  np.testing.assert_array_equal(x[:, 2:], np.broadcast_to([255, 255, 255], (4, 2, 3)))
  # round(128/255 * c + 127/255 * 255): [127, 127, 255].
  np.testing.assert_array_equal(x[0, 0], [127, 127, 255])
  black = _load(tmp_path / 'a.png', background=(0, 0, 0))
  np.testing.assert_array_equal(black[:, 2:], np.zeros((4, 2, 3)))


def test_load_image_palette_transparent_index_and_la(tmp_path):
  palette = Image.fromarray(np.array([[0, 1] * 2] * 4, np.uint8), 'P')
  palette.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)  # 0: blue, 1: green
  palette.save(tmp_path / 'p.png', transparency=1)
  x = _load(tmp_path / 'p.png', background=(10, 20, 30))
  np.testing.assert_array_equal(x[:, 0::2], np.broadcast_to([0, 0, 255], (4, 2, 3)))
  np.testing.assert_array_equal(x[:, 1::2], np.broadcast_to([10, 20, 30], (4, 2, 3)))

  la = np.zeros((4, 4, 2), np.uint8)
  la[..., 0] = 200
  la[:, 2:, 1] = 255  # left half transparent
  Image.fromarray(la, 'LA').save(tmp_path / 'la.png')
  gray = _load(tmp_path / 'la.png', num_channels=1, background=(0, 0, 0))
  assert gray.shape == (4, 4, 1)
  np.testing.assert_array_equal(gray[:, :2, 0], np.zeros((4, 2)))
  np.testing.assert_array_equal(gray[:, 2:, 0], np.full((4, 2), 200))


def test_load_image_scales_16_bit_by_its_range(tmp_path):
  rows = np.repeat(np.array([0, 16384, 32768, 65535], np.uint16)[:, None], 4, 1)
  Image.fromarray(rows).save(tmp_path / 'i16.png')
  with Image.open(tmp_path / 'i16.png') as image:
    assert image.mode.startswith('I')  # what Pillow makes of a 16-bit PNG
  x = _load(tmp_path / 'i16.png', num_channels=1)
  np.testing.assert_array_equal(x[:, 0, 0], [0, 64, 128, 255])
  rgb = _load(tmp_path / 'i16.png')
  np.testing.assert_array_equal(rgb[:, 0], np.repeat([[0], [64], [128], [255]], 3, 1))


def test_load_image_scales_32_bit_integers_and_floats_by_their_range(tmp_path):
  levels = np.array([-1000, 0, 1000, 3000], np.int32)  # outside [0, 65535]: min..max
  Image.fromarray(np.repeat(levels[:, None], 4, 1), 'I').save(tmp_path / 'i32.tif')
  np.testing.assert_array_equal(_load(tmp_path / 'i32.tif', 1)[:, 0, 0],
                                [0, 64, 128, 255])  # 255 * [0, 1/4, 1/2, 1]
  unit = np.array([0.0, 0.25, 0.5, 1.0], np.float32)  # within [0, 1]: 255 v
  Image.fromarray(np.repeat(unit[:, None], 4, 1), 'F').save(tmp_path / 'f.tif')
  np.testing.assert_array_equal(_load(tmp_path / 'f.tif', 1)[:, 0, 0], [0, 64, 128, 255])
  wide = np.array([-2.0, 0.0, 2.0, 6.0], np.float32)  # else min..max
  Image.fromarray(np.repeat(wide[:, None], 4, 1), 'F').save(tmp_path / 'g.tif')
  np.testing.assert_array_equal(_load(tmp_path / 'g.tif', 1)[:, 0, 0], [0, 64, 128, 255])


def test_load_image_applies_exif_orientation_and_converts_cmyk(tmp_path):
  image = np.zeros((4, 8, 3), np.uint8)
  image[:, :4] = [255, 0, 0]  # left red, right blue
  image[:, 4:] = [0, 0, 255]
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to display
  Image.fromarray(image).save(tmp_path / 'r.png', exif=exif)
  x = input_pipeline.load_image(tmp_path / 'r.png', image_size=8, num_channels=3)
  # Upright the image is 4 wide and 8 high, red on top; the centered square of
  # 4 x 4 straddles the red/blue boundary in the middle rows.
  assert x[0, 4, 0] > 200 and x[7, 4, 2] > 200
  Image.new('CMYK', (4, 4), (0, 255, 255, 0)).save(tmp_path / 'c.jpg')  # red
  np.testing.assert_allclose(_load(tmp_path / 'c.jpg')[2, 2], [255, 0, 0], atol=3)


def test_load_image_raises_on_undecodable_files_and_bad_arguments(tmp_path):
  (tmp_path / 'bad.png').write_bytes(b'not a png')
  with pytest.raises(OSError):
    _load(tmp_path / 'bad.png')
  Image.new('RGB', (4, 4)).save(tmp_path / 'ok.png')
  with pytest.raises(ValueError, match='background'):
    _load(tmp_path / 'ok.png', background=(0, 0, 256))


def test_folder_of_mixed_modes_and_sizes_composites_transparency(tmp_path):
  rgba = np.zeros((6, 10, 4), np.uint8)  # fully transparent red
  rgba[..., 0] = 255
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'a.png')
  Image.fromarray(np.full((7, 5), 65535, np.uint16)).save(tmp_path / 'b.png')
  Image.new('CMYK', (9, 9), (0, 0, 0, 0)).save(tmp_path / 'c.jpg')
  Image.new('L', (3, 12), 255).save(tmp_path / 'd.webp')
  pipeline = input_pipeline.create_dataset(
      source='folder', path=str(tmp_path), image_size=4, batch_size=4, seed=0,
      num_epochs=1, background=(255, 255, 255))
  (batch,) = _all_batches(pipeline)
  # Every one of them is white as the model sees it ([-1, 1]).
  np.testing.assert_allclose(batch['x'], np.ones((4, 4, 4, 3)), atol=0.02)
