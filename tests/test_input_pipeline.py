"""Tests of diffusion_jax.input_pipeline: sources, order, sharding, resuming."""

import json
import logging

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
  # Filtered before batching: 4 good images make 2 full batches.
  assert [b['x'].shape for b in batches] == [(2, 8, 8, 3)] * 2
  assert pipeline.num_skipped() == 2
  assert 'corrupt.png' in caplog.text and 'truncated.png' in caplog.text
  # Sorted relative paths: cat/a, cat/nested/deeper/b, dog/c, dog/d.
  x = np.concatenate([b['x'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  np.testing.assert_array_equal(labels, [0, 0, 1, 1])
  assert x.dtype == np.float32 and x.min() >= -1.0 and x.max() <= 1.0
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


def test_shards_are_disjoint_and_cover_the_data(tmp_path):
  path = _id_array(tmp_path, 13)
  shards = []
  for index in range(3):
    pipeline = input_pipeline.create_dataset(
        source='array', path=path, batch_size=2, seed=0, num_epochs=2,
        process_index=index, process_count=3)
    ids = sum(_ids(_all_batches(pipeline)), [])
    assert len(ids) == 8  # 4 examples per shard (13 // 3) x 2 epochs
    shards.append(set(ids))
  assert all(len(s) == 4 for s in shards)
  assert not (shards[0] & shards[1] or shards[0] & shards[2]
              or shards[1] & shards[2])
  assert set.union(*shards) == set(range(12))


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
  # 6 batches = 12 good images = 3 epochs, with 2 corrupt files each; a
  # worker may already have passed some corrupt files of the next epoch.
  assert original.num_skipped() >= 4
  original.iterator.close()

  restored = input_pipeline.create_dataset(**kwargs)
  restored.iterator.set_state(state)
  for got, want in zip(_take(restored, 2), expected):
    np.testing.assert_array_equal(got['x'], want['x'])
    np.testing.assert_array_equal(got['label'], want['label'])
  restored.iterator.close()
