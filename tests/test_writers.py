"""diffusion_jax.writers on a non-local path: metrics.jsonl, TensorBoard events, PNG and .npz.

The workdir is ``gs://...`` served by an in-memory fsspec filesystem registered as epath's
``gs`` backend. Like GCS it cannot append to an object (mode 'a' raises here; gcsfs would
silently overwrite). A writer that used ``open``/``os`` on the literal path would fail on the
missing ``gs:`` directory or create it in the working directory, which the tests check is empty.
Event files are read back by parsing the TFRecord framing with an independent CRC-32C and the
``Event`` protos.
"""

import io
import json
import struct
import uuid

import fsspec
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from PIL import Image
from tensorboardX.proto import event_pb2

from diffusion_jax import writers

# --------------------------------------------------------------------------------------------
# An independent CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, RFC 3720 B.4) and the
# masking of TensorFlow's record format (tensorflow/core/lib/hash/crc32c.h).


def _crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
  crc = _crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_reference_check_value():
  assert _crc32c(b'123456789') == 0xE3069283  # the standard check value of CRC-32C


def _read_events(data: bytes) -> list:
  """Parses a TFRecord file of Event protos, checking both CRCs of every record."""
  events, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack('<Q', header)
    (header_crc,) = struct.unpack('<I', data[pos + 8:pos + 12])
    assert header_crc == _masked(header)
    payload = data[pos + 12:pos + 12 + length]
    (payload_crc,) = struct.unpack('<I', data[pos + 12 + length:pos + 16 + length])
    assert len(payload) == length and payload_crc == _masked(payload)
    events.append(event_pb2.Event.FromString(payload))
    pos += 16 + length
  return events


# --------------------------------------------------------------------------------------------
# A fake gs:// filesystem.


class _MemoryGCS(epath_backend._FileSystemSpecBackend):  # pylint: disable=protected-access
  """epath's fsspec backend over fsspec's in-memory filesystem, without append (as GCS)."""

  def fs(self, path):
    return fsspec.filesystem('memory')

  def open(self, path, mode):
    if 'a' in mode:
      raise OSError(f'object stores cannot append: {path} (mode {mode!r})')
    return super().open(path, mode)


@pytest.fixture
def gcs_workdir(monkeypatch, tmp_path):
  # pylint: disable-next=protected-access
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, 'gs', _MemoryGCS())
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  monkeypatch.chdir(tmp_path)  # where a literal open('gs://...') / os.makedirs would land
  workdir = epath.Path(f'gs://bucket-{uuid.uuid4().hex}/run')
  yield workdir
  memory = fsspec.filesystem('memory')
  for key in [k for k in memory.store if k.startswith(str(workdir.parent))]:
    del memory.store[key]
  assert not list(tmp_path.iterdir()), 'a writer used the local filesystem'


def _check_run_outputs(workdir):
  """Writes a run's outputs under ``workdir`` (restarted once) and reads every file back."""
  w = writers.MetricWriter(workdir)
  w.write_text('config', 'model.ch = 8')
  w.write(0, {'num_params': 1234})
  w.write(10, {'loss': np.float32(0.5), 'lr': 1e-3, 'hist': np.arange(3)})
  w.close()
  w = writers.MetricWriter(workdir)  # a resumed run: metrics.jsonl continues
  w.write(20, {'loss': 0.25})
  w.close()
  writers.MetricWriter(workdir, enabled=False).write(30, {'loss': 9.0})  # not process 0

  rows = [json.loads(line)
          for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert rows == [{'step': 0, 'num_params': 1234},
                  {'step': 10, 'loss': 0.5, 'lr': 1e-3, 'hist': [0, 1, 2]},
                  {'step': 20, 'loss': 0.25}]

  files = sorted((workdir / 'tensorboard').iterdir(), key=str)
  assert len(files) == 2 and all('tfevents' in f.name for f in files)
  scalars, texts = {}, {}
  for f in files:
    events = _read_events(f.read_bytes())
    assert events[0].file_version == 'brain.Event:2'
    for e in events[1:]:
      for v in e.summary.value:
        if v.tensor.string_val:
          texts[v.tag] = v.tensor.string_val[0].decode()
        else:
          scalars[(v.tag, e.step)] = v.simple_value
  assert scalars == {('num_params', 0): 1234.0, ('loss', 10): 0.5,
                     ('lr', 10): pytest.approx(1e-3), ('loss', 20): 0.25}
  assert texts == {'config/text_summary': 'model.ch = 8'}

  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (5, 4, 3, 3)).astype(np.float32)
  writers.save_image_grid(workdir / 'samples' / 'grid.png', images, upscale=2)
  png = np.asarray(Image.open(io.BytesIO((workdir / 'samples' / 'grid.png').read_bytes())))
  grid = writers.image_grid(images)
  np.testing.assert_array_equal(png, grid.repeat(2, axis=0).repeat(2, axis=1))
  gray = rng.uniform(-1, 1, (2, 4, 4, 1))
  writers.save_image_grid(str(workdir / 'gray.png'), gray)
  np.testing.assert_array_equal(
      np.asarray(Image.open(io.BytesIO((workdir / 'gray.png').read_bytes()))),
      writers.image_grid(gray)[..., 0])

  writers.save_npz(workdir / 'samples' / 'x.npz', x=images, images=writers.to_uint8(images))
  with np.load(io.BytesIO((workdir / 'samples' / 'x.npz').read_bytes())) as npz:
    assert sorted(npz.files) == ['images', 'x']
    np.testing.assert_array_equal(npz['x'], images)
    assert npz['images'].dtype == np.uint8


def test_writers_on_a_gcs_path(gcs_workdir):
  _check_run_outputs(gcs_workdir)


def test_writers_on_a_local_path(tmp_path):
  _check_run_outputs(epath.Path(tmp_path / 'run'))


def test_record_framing_is_tensorboardx_s(tmp_path):
  """Our TFRecord framing byte for byte against tensorboardX's own (local-file) RecordWriter."""
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
  payloads = [b'', b'x', event_pb2.Event(step=3, wall_time=1.5).SerializeToString(),
              bytes(range(256)) * 5]
  path = str(tmp_path / 'ref.tfevents')
  ref = record_writer.RecordWriter(path)
  for p in payloads:
    ref.write(p)
  ref.close()
  with open(path, 'rb') as f:
    assert f.read() == b''.join(writers.tfrecord(p) for p in payloads)
