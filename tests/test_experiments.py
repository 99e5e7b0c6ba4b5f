"""The accelerator benchmark runs end to end (tiny U-Net on CPU), so that the few minutes of a lent
GPU are not lost to a broken script."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_accel_smoke(tmp_path):
  out_json = tmp_path / 'rows.json'
  out = subprocess.run(
      [sys.executable, 'experiments/bench_accel.py', '--smoke', '--peak_tflops=1',
       '--variants=float32/none/auto,float32/full/auto,bfloat16/none/cudnn', f'--json={out_json}'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = json.loads(out_json.read_text())
  assert [(r['dtype'], r['remat']) for r in rows] == [('float32', 'none'), ('float32', 'full')]
  for r in rows:
    assert r['img_s'] > 0 and r['gflop_per_step'] > 0 and 0 < r['mfu'] <= r['hfu']
  # The remat variant recomputes: more FLOPs per step, MFU counted on the model's FLOPs.
  assert rows[1]['gflop_per_step'] > rows[0]['gflop_per_step']
  assert 'bfloat16/none/cudnn: skipped' in out.stdout
