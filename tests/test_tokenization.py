"""CLIP tokenizer: ids equal to transformers' and to OpenAI's BPE algorithm, written out here.

No real CLIP vocabulary can be downloaded, so the test learns a small one in CLIP's format (the
256 byte characters in GPT-2's byte-to-unicode order, their ``</w>`` forms, the learned merges,
``<|startoftext|>``, ``<|endoftext|>``; ``merges.txt`` with a ``#version`` line) from a corpus
with accents, CJK and digits, and writes it as a diffusers ``tokenizer/`` folder that
transformers and we both load.

References:
- transformers' ``CLIPTokenizer`` (what diffusers runs). In transformers 5 the Python ("slow")
  CLIP tokenizer is gone and ``CLIPTokenizerFast`` is the same class; both names are checked.
- ``_openai_encode``: OpenAI's ``clip/simple_tokenizer.py`` algorithm (regex pieces, byte
  characters, rank-ordered merges with ``</w>``) in plain Python, as the independent slow
  reference. Its ``ftfy.fix_text`` is replaced by NFC (ftfy is not installed; on these prompts,
  which have no mojibake, curly quotes or full-width forms, fix_text is NFC) and its
  ``html.unescape`` is left out, as transformers leaves it out.
"""

from __future__ import annotations

import collections
import json
import unicodedata

import numpy as np
import pytest
import regex
import transformers

from diffusion_jax import tokenization

CORPUS = """a photograph of an astronaut riding a horse on the moon, highly detailed, 8k, trending
on artstation. the quick brown fox jumps over the lazy dog! it's a cat's life; we're here and
they've gone, i'm sure you'll see what he'd do. café déjà vu, naïve façade, Ångström, über.
東京タワーの夜景 北京 서울 москва 123 456 7890 (masterpiece:1.2) [[best quality]] 😀 painting
of a portrait, oil on canvas, by greg rutkowski, unreal engine, octane render, 4k, sharp focus"""

PROMPTS = [
    'a photograph of an astronaut riding a horse',
    'A Photo of THE Cat, Highly-Detailed!!! 8K, (masterpiece:1.2) [[best quality]]',
    '  extra   whitespace\tand\nnew lines\u00a0 and\u3000ideographic space  ',
    'café déjà vu naïve Ångström ÜBER FAÇADE',
    'cafe\u0301 decomposed e\u0301 (NFC makes these café, é)',
    '東京タワー 夜景 서울 Москва ΑΘΗΝΑ',
    'emoji 😀🐱\u200d👤 🇯🇵 ❤️ ✨✨',
    'numbers 1234567890 3.14 1,000,000 ½ ² ٣ and 2nd',
    "it's don't we're I've I'M you'll he'd IT'S",
    '',
    'a <|endoftext|> b <|startoftext|>',
    ' '.join(['highly detailed painting of a fox'] * 20),  # far more than 77 tokens
    'oil painting, ' * 40,
]


def _bytes_to_unicode():
  """GPT-2 / CLIP's map from the 256 bytes to printable characters."""
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
               + list(range(ord('®'), ord('ÿ') + 1)))
  chars, extra = printable[:], 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(printable, map(chr, chars)))


BYTES = _bytes_to_unicode()
PIECES = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                       r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


def _symbols(piece):
  s = ''.join(BYTES[b] for b in piece.encode('utf-8'))
  return tuple(s[:-1]) + (s[-1] + '</w>',)


def _merge(word, pair):
  out, i = [], 0
  while i < len(word):
    if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
      out.append(word[i] + word[i + 1])
      i += 2
    else:
      out.append(word[i])
      i += 1
  return tuple(out)


def _learn_merges(text, num_merges):
  """Plain BPE training (Sennrich et al. 2016) over CLIP's pieces: the most frequent pair first."""
  words = collections.Counter(_symbols(p) for p in PIECES.findall(text.lower()))
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for w, c in words.items():
      for pair in zip(w, w[1:]):
        pairs[pair] += c
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    words = collections.Counter({_merge(w, best): c for w, c in words.items()})
  return merges


MERGES = _learn_merges(CORPUS, 200)
VOCAB_LIST = (list(BYTES.values()) + [c + '</w>' for c in BYTES.values()]
              + [a + b for a, b in MERGES] + ['<|startoftext|>', '<|endoftext|>'])
VOCAB = {t: i for i, t in enumerate(VOCAB_LIST)}
RANKS = {m: i for i, m in enumerate(MERGES)}


def _openai_bpe(piece):
  if piece in ('<|startoftext|>', '<|endoftext|>'):
    return [piece]
  word = _symbols(piece)
  while len(word) > 1:
    pair = min(zip(word, word[1:]), key=lambda p: RANKS.get(p, float('inf')))
    if pair not in RANKS:
      break
    word = _merge(word, pair)
  return list(word)


def _openai_encode(text, max_length=77):
  """OpenAI CLIP's encode + SD's truncation and padding (``<|endoftext|>`` as pad)."""
  text = regex.sub(r'\s+', ' ', unicodedata.normalize('NFC', text)).strip().lower()
  ids = [VOCAB[t] for p in PIECES.findall(text) for t in _openai_bpe(p)]
  ids = [VOCAB['<|startoftext|>']] + ids[:max_length - 2] + [VOCAB['<|endoftext|>']]
  return ids + [VOCAB['<|endoftext|>']] * (max_length - len(ids)), len(ids)


def _write(directory, **files):
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'vocab.json').write_text(json.dumps(VOCAB, ensure_ascii=False), encoding='utf-8')
  (directory / 'merges.txt').write_text(
      '#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in MERGES), encoding='utf-8')
  for name, content in files.items():
    (directory / f'{name}.json').write_text(json.dumps(content))
  return directory


def _special(content):
  return {'content': content, 'lstrip': False, 'normalized': True, 'rstrip': False,
          'single_word': False}


# SD 1.x's tokenizer/ (openai/clip-vit-large-patch14's files, pre-transformers-4.34 format) and
# SD 2.x's / SDXL tokenizer_2/ (pad "!" in special_tokens_map.json, which wins).
SD1_FILES = dict(
    tokenizer_config={'bos_token': {'__type': 'AddedToken', **_special('<|startoftext|>')},
                      'eos_token': {'__type': 'AddedToken', **_special('<|endoftext|>')},
                      'unk_token': {'__type': 'AddedToken', **_special('<|endoftext|>')},
                      'pad_token': '<|endoftext|>', 'model_max_length': 77,
                      'do_lower_case': True, 'tokenizer_class': 'CLIPTokenizer'},
    special_tokens_map={'bos_token': _special('<|startoftext|>'),
                        'eos_token': _special('<|endoftext|>'),
                        'unk_token': _special('<|endoftext|>'), 'pad_token': '<|endoftext|>'})
SD2_FILES = dict(
    tokenizer_config={**SD1_FILES['tokenizer_config']},
    special_tokens_map={**SD1_FILES['special_tokens_map'], 'pad_token': '!'})


def _theirs(directory):
  return transformers.CLIPTokenizer.from_pretrained(directory)


def _their_ids(tok, prompts, max_length=77, **kw):
  kw = {'padding': 'max_length', 'truncation': True, **kw}
  return np.array(tok(prompts, max_length=max_length, **kw)['input_ids'])


@pytest.fixture(name='plain_dir')
def fixture_plain_dir(tmp_path):
  return _write(tmp_path / 'plain')


def test_vocabulary_is_clip_format():
  assert len(MERGES) == 200 and len(VOCAB) == len(VOCAB_LIST)  # merges are all distinct
  assert any('</w>' in a + b and len((a + b).removesuffix('</w>')) > 3 for a, b in MERGES)


@pytest.mark.parametrize('files', ['plain', 'sd1'])
def test_ids_equal_transformers_and_openai(tmp_path, files):
  directory = _write(tmp_path / files, **(SD1_FILES if files == 'sd1' else {}))
  ours = tokenization.CLIPTokenizer.from_directory(directory)
  assert ours.model_max_length == 77 and ours.pad_token_id == VOCAB['<|endoftext|>']
  got = ours(PROMPTS)
  assert got.dtype == np.int32 and got.shape == (len(PROMPTS), 77)
  np.testing.assert_array_equal(got, _their_ids(_theirs(directory), PROMPTS))
  np.testing.assert_array_equal(
      got, _their_ids(transformers.CLIPTokenizerFast.from_pretrained(directory), PROMPTS))
  for prompt, row in zip(PROMPTS, got):
    assert row.tolist() == _openai_encode(prompt)[0], prompt
  # Every prompt holds tokens beyond the byte alphabet (merges apply) and some hold several
  # byte tokens per character (UTF-8), so the comparisons above cover both.
  assert (got >= 512).any() and len(ours.tokenize('東京')) > 2


def test_truncation_count_and_lengths(plain_dir):
  ours = tokenization.CLIPTokenizer.from_directory(plain_dir)
  theirs = _theirs(plain_dir)
  enc = ours.encode(PROMPTS)
  full = [len(x) for x in theirs(PROMPTS)['input_ids']]  # untruncated, with start and end
  assert enc.num_tokens.tolist() == full == [_openai_encode(p, 10**6)[1] for p in PROMPTS]
  assert enc.truncated.tolist() == [n > 77 for n in full]
  assert enc.num_truncated == 2
  # Truncated rows keep the end token last; short rows are padded after it.
  assert (enc.input_ids[enc.truncated, -1] == ours.eos_token_id).all()
  for max_length in (5, 20):
    np.testing.assert_array_equal(ours(PROMPTS, max_length=max_length),
                                  _their_ids(theirs, PROMPTS, max_length=max_length))
  longest = ours(PROMPTS[:3], padding='longest')
  np.testing.assert_array_equal(
      longest, np.array(theirs(PROMPTS[:3], padding='longest', truncation=True,
                               max_length=77)['input_ids']))
  assert longest.shape[1] == max(full[:3])
  np.testing.assert_array_equal(ours('a cat'), ours(['a cat']))


def test_sd2_pads_with_exclamation_mark(tmp_path):
  directory = _write(tmp_path / 'sd2', **SD2_FILES)
  ours = tokenization.CLIPTokenizer.from_directory(directory)
  theirs = _theirs(directory)
  assert ours.pad_token_id == theirs.pad_token_id == VOCAB['!'] == 0
  prompts = PROMPTS + ['wow!! really!', 'a <|ENDOFTEXT|> b']
  got = ours(prompts)
  np.testing.assert_array_equal(got, _their_ids(theirs, prompts))
  n = ours.encode(prompts[0]).num_tokens[0]
  assert got[0, n - 1] == ours.eos_token_id and (got[0, n:] == 0).all()


def test_saved_by_transformers_with_added_tokens(tmp_path, plain_dir):
  theirs = _theirs(plain_dir)
  their_new = theirs.add_tokens(['<cat-toy>', 'Dog2'])
  ours = tokenization.CLIPTokenizer.from_directory(plain_dir)
  ids = ours.add_tokens(['<cat-toy>', 'Dog2'])
  assert their_new == 2 and ids == theirs.convert_tokens_to_ids(['<cat-toy>', 'Dog2'])
  assert ids == [len(VOCAB), len(VOCAB) + 1] and len(ours) == len(VOCAB) + 2
  prompts = PROMPTS + ['a <cat-toy> and <Cat-Toy> and dog2 Dog2 x<cat-toy>y']
  np.testing.assert_array_equal(ours(prompts), _their_ids(theirs, prompts))
  # transformers 5 saves tokenizer.json (no vocab.json / merges.txt); we read that too.
  saved = tmp_path / 'saved'
  theirs.save_pretrained(saved)
  assert (saved / 'tokenizer.json').exists() and not (saved / 'vocab.json').exists()
  reloaded = tokenization.CLIPTokenizer.from_directory(saved)
  np.testing.assert_array_equal(reloaded(prompts), _their_ids(_theirs(saved), prompts))
  with pytest.raises(ValueError, match='already in the tokenizer'):
    ours.add_tokens(['<cat-toy>'])
  with pytest.raises(ValueError, match='already in the tokenizer'):
    ours.add_tokens(['cat</w>' if 'cat</w>' in VOCAB else 'a</w>'])


def test_decode(plain_dir):
  ours = tokenization.CLIPTokenizer.from_directory(plain_dir)
  theirs = _theirs(plain_dir)
  for row in ours(PROMPTS[:9]):
    assert ours.decode(row) == theirs.decode(row.tolist(), skip_special_tokens=True)
  assert ours.decode(ours('A Photo of the CAT!')[0]) == 'a photo of the cat !'


def test_bad_input(tmp_path, plain_dir):
  with pytest.raises(FileNotFoundError, match='vocab.json and merges.txt'):
    tokenization.CLIPTokenizer.from_directory(tmp_path / 'missing')
  ours = tokenization.CLIPTokenizer.from_directory(plain_dir)
  with pytest.raises(ValueError, match='padding'):
    ours('a', padding='do_not_pad')
  with pytest.raises(ValueError, match='truncation=False'):
    ours(PROMPTS, truncation=False)
  longest = max(len(x) for x in _theirs(plain_dir)(PROMPTS)['input_ids'])
  assert longest > 77
  assert ours(PROMPTS, truncation=False, padding='longest').shape == (len(PROMPTS), longest)
  with pytest.raises(ValueError, match='strings'):
    ours(['a', None])
  with pytest.raises(ValueError, match='max_length'):
    ours('a', max_length=1)
