r"""Are the digits job's samples recognizable digits? Trains, samples 1,000, classifies them.

    python experiments/digits_quality.py --config=configs/digits.py --workdir=runs/digits_quality

1. Trains ``configs/digits.py`` (timed, wall clock; skipped with --skip_train if the workdir
   already holds the final checkpoint).
2. Samples ``--num_samples`` images with the config's sampler from the EMA params.
3. Trains scikit-learn classifiers on 75% of the real digits (an MLP, a logistic regression and
   an RBF-kernel SVM with Platt-scaled probabilities),
   checks them on the held-out 25%, and reports for the real held-out digits (the reference) and
   for the samples: the fraction classified with probability >= 0.9, and the samples' class
   histogram (all 10 classes present? largest share?).

Prints a Markdown table and writes ``workdir/digits_quality.json``.
"""

import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/digits.py', 'Config file.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/digits_quality', 'Work directory.')
_SKIP_TRAIN = flags.DEFINE_bool('skip_train', False, 'Reuse the workdir\'s checkpoint.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1000, 'Samples to classify.')
_THRESHOLD = 0.9


def _classifiers():
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  from sklearn.neural_network import MLPClassifier  # pylint: disable=import-outside-toplevel
  from sklearn.pipeline import make_pipeline  # pylint: disable=import-outside-toplevel
  from sklearn.preprocessing import StandardScaler  # pylint: disable=import-outside-toplevel
  from sklearn.calibration import CalibratedClassifierCV  # pylint: disable=import-outside-toplevel
  from sklearn.svm import SVC  # pylint: disable=import-outside-toplevel
  return {
      'mlp': MLPClassifier(hidden_layer_sizes=(128,), max_iter=1000, random_state=0),
      'logreg': make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
      # scikit-learn's digits example's RBF kernel (gamma 0.001 on the 0..16 pixel scale; C = 1,
      # within 0.001 of the best 5-fold log loss on the training digits over C 1-100, gamma
      # 1e-4 - 3e-3), with Platt-scaled probabilities.
      'svm': CalibratedClassifierCV(SVC(kernel='rbf', gamma=0.001), method='sigmoid',
                                    ensemble=False),
  }


def _to_sklearn_scale(images, image_size: int):
  """Samples in [-1, 1] at image_size -> 8x8 pixel values in [0, 16], as load_digits gives them."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  x = np.clip((np.asarray(images)[..., 0] + 1.0) / 2.0 * 16.0, 0.0, 16.0)
  if image_size != 8:
    x = np.stack([np.asarray(Image.fromarray(im.astype(np.float32), mode='F').resize(
        (8, 8), Image.BILINEAR)) for im in x])
  return x.reshape(len(x), 64)


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  from sklearn.model_selection import train_test_split  # pylint: disable=import-outside-toplevel

  from diffusion_jax import cpu_runtime, training  # pylint: disable=import-outside-toplevel

  cpu_runtime.configure()  # as diffusion_jax.main does: the same job, timed as the CLI runs it
  config = _CONFIG.value
  workdir = _WORKDIR.value
  result = {'config': 'configs/digits.py', 'cpu_cores': os.cpu_count(),
            'load_average_before': os.getloadavg()}
  if not _SKIP_TRAIN.value:
    t0 = time.time()
    training.train_and_evaluate(config, workdir)
    result['train_wall_s'] = time.time() - t0
  with config.unlocked():
    config.sampling.num_samples = _NUM_SAMPLES.value
  t0 = time.time()
  path = training.sample(config, workdir)
  result['sample_wall_s'] = time.time() - t0
  result['sampler'] = f'{config.sampling.method}, {config.sampling.num_steps} steps'
  samples = _to_sklearn_scale(np.load(path)['x'], config.data.image_size)

  x, y = load_digits(return_X_y=True)
  x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
  rows = []
  for name, clf in _classifiers().items():
    clf.fit(x_tr, y_tr)
    p_real = clf.predict_proba(x_te)
    p_gen = clf.predict_proba(samples)
    hist = np.bincount(p_gen.argmax(1), minlength=10)
    rows.append({
        'classifier': name,
        'real_accuracy': float((p_real.argmax(1) == y_te).mean()),
        'real_confident': float((p_real.max(1) >= _THRESHOLD).mean()),
        'samples_confident': float((p_gen.max(1) >= _THRESHOLD).mean()),
        'class_histogram': hist.tolist(),
        'classes_present': int((hist > 0).sum()),
        'max_class_share': float(hist.max() / hist.sum()),
    })
  result['classifiers'] = rows
  result['load_average_after'] = os.getloadavg()
  with open(os.path.join(workdir, 'digits_quality.json'), 'w') as f:
    json.dump(result, f, indent=1)

  print(f'\ntrain wall time: {result.get("train_wall_s", float("nan")):.0f} s on '
        f'{os.cpu_count()} cores; sampling {len(samples)} ({result["sampler"]}): '
        f'{result["sample_wall_s"]:.0f} s; devices: {jax.devices()}')
  print('\n| classifier | accuracy on real (held out) | real with p>=0.9 | samples with p>=0.9 '
        '| classes present | largest class share | histogram 0..9 |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["classifier"]} | {r["real_accuracy"]:.3f} | {r["real_confident"]:.3f} | '
          f'{r["samples_confident"]:.3f} | {r["classes_present"]} | {r["max_class_share"]:.3f} | '
          f'{r["class_histogram"]} |')


if __name__ == '__main__':
  app.run(main)
