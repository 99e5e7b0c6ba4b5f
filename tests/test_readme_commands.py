"""Every command that README.md and docs/*.md show runs as written, or is listed here with the
reason it is not run (issue 21).

The commands are extracted from the documents themselves: each line of a code block that is not
Python (joined over trailing backslashes, split at ``&&``), each indented command line, each
inline ``python ...`` span, and the ``--mode=...`` fragments of README's "Train, sample, resume,
evaluate" section, which are flags added to README's default job (its first
``python -m diffusion_jax.main`` command). A command that none of the rules below classifies fails
`test_every_documented_command_is_run_or_skipped_with_a_reason`: a new command in the docs is
either run here or given a reason.

How they run: as a user runs them (``python`` is this interpreter), in a temporary directory that
holds a copy of ``configs/`` and the files README names (``three.png``: a real 3 of the digits;
``mask.png``: white left half), with step and sample counts made tiny by ``--config.a.b=value``
overrides appended after the command's own flags, for fields it does not set itself
(`TINY`), and the test suite's compilation cache (``training.compilation_cache_dir``: compiled
programs only, the results are the same).

Not run, with the reason (`SKIPPED`): package installs and TFDS downloads (network), the test
suite itself and its parts (they run as tests), ``experiments/`` benchmarks and quality checks
(minutes to hours of training or peers' PyTorch; their figures are in docs/benchmarks.md),
pretrained Stable Diffusion weights, templates with placeholders, a class-conditional model.

Slow (``-m slow``): README's latent text-to-image job (configs/ldm_digits.py), which cannot be
made tiny in time: even at 2 steps per stage it compiles an AutoencoderKL, a text transformer and
a conditional U-Net, 2 to 4 minutes on 2 cores (README and docs/benchmarks.md both show it), more
than the budget of this whole file.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ['README.md'] + sorted(os.path.join('docs', f) for f in os.listdir(os.path.join(REPO, 'docs'))
                              if f.endswith('.md'))
MAIN = 'python -m diffusion_jax.main'
PROGRAMS = ('python', 'python3', 'pip', 'tfds', 'gcloud', 'bash', 'sh')
# The section of README whose inline `--mode=...` fragments are flags of the default job.
MODES_SECTION = '## Train, sample, resume, evaluate'

# Tiny counts for the jobs that run, appended unless the command sets the field itself.
_CACHE = os.environ.get('DIFFUSION_JAX_TEST_CACHE') or os.path.join(tempfile.gettempdir(),
                                                                    'diffusion_jax_test_xla_cache')
TINY = {
    'configs/digits.py': {
        'training.num_train_steps': 2, 'training.log_every': 2, 'training.checkpoint_every': 2,
        'training.num_sample_images': 4, 'sampling.num_samples': 4, 'sampling.batch_size': 4,
        'eval.num_examples': 4, 'eval.batch_size': 4, 'eval.rtol': 1e-3, 'eval.atol': 1e-3,
        'training.compilation_cache_dir': _CACHE},
    'configs/ldm_digits.py': {
        'autoencoder.num_train_steps': 2, 'autoencoder.scale_examples': 64,
        'training.num_train_steps': 2, 'training.log_every': 2, 'training.checkpoint_every': 2,
        'training.num_sample_images': 2, 'sampling.num_samples': 2, 'sampling.batch_size': 2,
        'training.compilation_cache_dir': _CACHE},
}
SLOW_CONFIGS = {'configs/ldm_digits.py': 'two stages compile an AutoencoderKL, a text transformer '
                                         'and a conditional U-Net: 2-4 min on 2 cores at 2 steps'}

# (regular expression matched at the start of a command, reason it is not run), first match wins.
SKIPPED = [
    (r'pip install', 'installs packages (network); the suite runs in the installed environment'),
    (r'tfds build', 'downloads a data set (network)'),
    (r'python -m pytest', 'runs tests of this suite, which run as tests'),
    (r'python experiments/', 'a benchmark or quality experiment: minutes to hours of training, or '
                             "peers' PyTorch; its figures and date are in docs/benchmarks.md"),
    (r'gcloud', 'needs a TPU pod'),
    (rf'{MAIN} --config=configs/cifar\.py', 'needs CIFAR-10 prepared by tfds build (network)'),
    (rf'{MAIN} --config=configs/sd\.py', 'needs pretrained Stable Diffusion weights'),
    (rf'{MAIN} .*[A-Z]{{3,}}', 'a template: CONFIG, DIR, MODE are placeholders'),
    (rf'{MAIN} .*--config\.sampling\.guidance_scale', 'needs a class-conditional model; the '
                                                      'default job is unconditional'),
]


def _logical_lines(lines):
  """Joins lines ending in a backslash; yields (first line number, text)."""
  buffer, start = '', None
  for number, line in lines:
    if start is None:
      start = number
    if line.rstrip().endswith('\\'):
      buffer += line.rstrip()[:-1] + ' '
      continue
    yield start, buffer + line
    buffer, start = '', None


def _split(text):
  """A shell line -> its commands (``a && b``), each a normalized string; comments dropped."""
  words = shlex.split(text, comments=True)
  commands, current = [], []
  for word in words + ['&&']:
    if word == '&&':
      if current:
        commands.append(shlex.join(current))
      current = []
    else:
      current.append(word)
  return commands


def documented_commands():
  """``[(where, command)]`` of every document, in order; ``where`` is ``FILE:LINE``."""
  found = []
  default_job = None
  for doc in DOCS:
    with open(os.path.join(REPO, doc)) as f:
      lines = f.read().splitlines()
    in_block, lang, block, prose = False, '', [], []
    for number, line in enumerate(lines, 1):
      fence = re.match(r'\s*```(\w*)', line)
      if fence:
        if in_block and lang != 'python':
          for start, text in _logical_lines(block):
            words = text.split()
            if words and (lang in ('bash', 'sh', 'shell') or words[0] in PROGRAMS):
              found += [(f'{doc}:{start}', c) for c in _split(text)]
        in_block, lang, block = not in_block, fence.group(1), []
        continue
      if in_block:
        block.append((number, line))
      elif re.match(r'    (' + '|'.join(PROGRAMS) + r') ', line):  # an indented code block
        found += [(f'{doc}:{number}', c) for c in _split(line)]
      else:
        prose.append((number, line))
    text = ' '.join(line.strip() for _, line in prose)  # inline spans may wrap over lines
    for span in re.findall(r'`([^`]+)`', text):
      span = ' '.join(span.split())
      if span.startswith(('python ', 'python3 ')):
        found.append((f'{doc} (inline)', span))
    if doc == 'README.md':
      default_job = next(c for _, c in found if c.startswith(MAIN))
      start = text.index(MODES_SECTION)
      end = text.find('## ', start + len(MODES_SECTION))
      for span in re.findall(r'`(--mode=[^`]+)`', text[start:end]):
        found.append((f'{doc} ({MODES_SECTION[3:]})', f'{default_job} {" ".join(span.split())}'))
  return found


def plan(command):
  """``('skip', reason)``, ``('run', config)`` or ``('slow', config)`` for a documented command."""
  for pattern, reason in SKIPPED:
    if re.match(pattern, command):
      return 'skip', reason
  if command.startswith(MAIN + ' '):
    config = re.search(r'--config=(\S+)', command)
    if config and config.group(1) in TINY:
      return ('slow' if config.group(1) in SLOW_CONFIGS else 'run'), config.group(1)
  return 'unclassified', None


def test_every_documented_command_is_run_or_skipped_with_a_reason():
  commands = documented_commands()
  assert len(commands) >= 15  # the extraction finds them (README alone shows more)
  unclassified = [(where, c) for where, c in commands if plan(c)[0] == 'unclassified']
  assert not unclassified, ('documented commands neither run by this test nor skipped with a '
                            f'reason (add them to TINY or SKIPPED): {unclassified}')
  run = [c for _, c in commands if plan(c)[0] == 'run']
  # README's default job and each of its modes are among those run.
  for mode in ('train', 'sample', 'eval', 'img2img', 'inpaint', 'invert'):
    assert any(f'--mode={mode}' in c for c in run), (mode, run)
  assert run[0] == f'{MAIN} --config=configs/digits.py --workdir=runs/digits'


def _with_tiny_counts(command, config):
  argv = shlex.split(command)
  given = {a.split('=', 1)[0] for a in argv}
  argv += [f'--config.{k}={v}' for k, v in TINY[config].items() if f'--config.{k}' not in given]
  assert argv[0] == 'python'
  return [sys.executable] + argv[1:]


def _prepare(cwd):
  shutil.copytree(os.path.join(REPO, 'configs'), cwd / 'configs')
  from sklearn import datasets  # pylint: disable=import-outside-toplevel
  digits = datasets.load_digits()
  three = digits.images[np.flatnonzero(digits.target == 3)[0]]
  Image.fromarray(np.uint8(np.round(three * 255 / 16))).save(cwd / 'three.png')
  mask = np.zeros((8, 8), np.uint8)
  mask[:, :4] = 255
  Image.fromarray(mask).save(cwd / 'mask.png')


def _run_all(cwd, kind):
  _prepare(cwd)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  ran = []
  for where, command in documented_commands():
    decision, config = plan(command)
    if decision != kind:
      continue
    out = subprocess.run(_with_tiny_counts(command, config), cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f'{where}: {command}\n{out.stderr[-3000:]}'
    ran.append((command, out))
  return ran


def test_the_default_job_and_its_modes_run_as_documented(tmp_path):
  ran = _run_all(tmp_path, 'run')
  outputs = {c.split('--workdir=runs/digits', 1)[1].strip(): out for c, out in ran}
  workdir = tmp_path / 'runs' / 'digits'
  assert outputs[''].stdout.strip().splitlines()[-1] == (
      'diffusion_jax: trained to step 2. Checkpoints runs/digits/checkpoints, metrics '
      'runs/digits/metrics.jsonl, samples runs/digits/samples.')
  assert 'start at step 2 of 2' in outputs['--mode=train'].stdout  # run again: it resumes
  samples = os.listdir(workdir / 'samples')
  assert 'dpmpp_3m_20_step2.npz' in samples, samples
  # --mode=eval on the digits without an override: a density's bits/dim, a bar that counts.
  eval_out = outputs['--mode=eval']
  assert re.search(r'bits/dim at step 2: -?\d+\.\d+ \+- \d+\.\d+ \(4 examples\)', eval_out.stdout)
  assert re.search(r'bits/dim: 100%\S* *\| 4/4', eval_out.stderr), eval_out.stderr[-2000:]
  invert = '--mode=invert --config.sampling.image=three.png --config.sampling.method=dpmpp_2m'
  assert 'PSNR' in outputs[invert].stdout


@pytest.mark.slow
def test_the_latent_text_to_image_job_runs_as_documented(tmp_path):
  ran = dict(_run_all(tmp_path, 'slow'))
  sample = [out for c, out in ran.items() if '--mode=sample' in c]
  assert len(ran) >= 2 and len(sample) == 1, list(ran)
  assert 'Wrote 2 images for 1 prompt(s)' in sample[0].stdout
