"""CLIP's byte-level BPE tokenizer on the ``tokenizers`` library, truncated and padded as SD does.

The pipeline is CLIP's (Radford et al. 2021; OpenAI ``clip/simple_tokenizer.py``), in the form
transformers' ``CLIPTokenizer`` gives the ``tokenizers`` library:

1. normalize: Unicode NFC, every whitespace run -> one space, lower case;
2. pre-tokenize: CLIP's regex ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|
   [\\p{N}]|[^\\s\\p{L}\\p{N}]+`` (letters runs, single digits, punctuation runs; whitespace
   dropped), then each piece's UTF-8 bytes as GPT-2's printable byte characters;
3. BPE with the ``</w>`` end-of-word suffix on each piece's last symbol (``merges.txt`` ranks);
4. ``<|startoftext|>`` ids ``<|endoftext|>``, truncated to ``model_max_length`` (77) keeping
   the final end-of-text token, and padded with the pad token: ``<|endoftext|>`` for SD 1.x,
   ``!`` (id 0) for SD 2.x and SDXL's second tokenizer (their ``special_tokens_map.json``).

OpenAI's tokenizer also runs ``ftfy.fix_text`` and ``html.unescape``; transformers' (the one
diffusers runs) does not, and neither does this one, so ids equal transformers' everywhere.
Special tokens are matched in the text as transformers matches them (``normalized`` tokens after
lower-casing), and tokens added with ``add_tokens`` (textual inversion) take the next ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import tokenizers
from etils import epath
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers

PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
           r"""[^\s\p{L}\p{N}]+""")
END_OF_WORD = '</w>'
BOS, EOS = '<|startoftext|>', '<|endoftext|>'
# CLIP's context length; used when a tokenizer_config.json gives none (transformers then says
# "unlimited", which no CLIP text model accepts).
DEFAULT_MAX_LENGTH = 77
PADDINGS = ('max_length', 'longest')
_SPECIAL_NAMES = ('bos_token', 'eos_token', 'unk_token', 'pad_token')
_TOKEN_FIELDS = ('single_word', 'lstrip', 'rstrip', 'normalized', 'special')


class Encoding(NamedTuple):
  """Token ids of a batch of prompts.

  Attributes:
    input_ids: ``int32 [B, L]``, ``L = max_length`` (or the longest row with
      ``padding='longest'``).
    num_tokens: ``int32 [B]``, tokens of each prompt before truncation, start and end included.
    truncated: ``bool [B]``, whether the prompt lost tokens to truncation.
  """
  input_ids: np.ndarray
  num_tokens: np.ndarray
  truncated: np.ndarray

  @property
  def num_truncated(self) -> int:
    """How many prompts were truncated."""
    return int(self.truncated.sum())


def _token(value: Any, *, special: bool) -> AddedToken | None:
  """A tokenizer_config / special_tokens_map entry (a string or an AddedToken dict) as AddedToken.

  A plain string is a special token matched verbatim (``normalized=False``), a dict keeps its
  flags, as transformers 5 reads them.
  """
  if value is None:
    return None
  if isinstance(value, str):
    return AddedToken(value, special=special, normalized=not special)
  if isinstance(value, Mapping) and 'content' in value:
    flags = {k: bool(value[k]) for k in _TOKEN_FIELDS if k in value}
    flags['special'] = special or flags.get('special', False)
    return AddedToken(value['content'], **flags)
  raise ValueError(f'cannot read the token {value!r}: expected a string or a dict with '
                   '"content".')


class CLIPTokenizer:
  """CLIP's BPE tokenizer (module docstring); ``tok(prompts) -> int32 [B, 77]``.

  Build it with ``from_directory`` (a diffusers ``tokenizer/`` folder) or from a vocabulary and
  merges.

  Args:
    vocab: token -> id (``vocab.json``): the 256 byte characters, their ``</w>`` forms, the
      merged tokens and the two special tokens.
    merges: pairs ``(left, right)`` in rank order (``merges.txt`` without its ``#version`` line).
    bos_token, eos_token, unk_token, pad_token: strings or ``tokenizers.AddedToken`` (their
      ``normalized`` flag decides whether they are matched before or after lower-casing).
    model_max_length: the length of every row (77).
    added_tokens: ``(id, AddedToken)`` beyond the vocabulary (saved textual-inversion tokens),
      added in id order.

  Raises:
    ValueError: a special token that is neither in ``vocab`` nor added, or added tokens whose
      ids do not follow the vocabulary.
  """

  def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *,
               bos_token: str | AddedToken = BOS, eos_token: str | AddedToken = EOS,
               unk_token: str | AddedToken = EOS, pad_token: str | AddedToken = EOS,
               model_max_length: int = DEFAULT_MAX_LENGTH,
               added_tokens: Iterable[tuple[int, AddedToken]] = ()):
    if model_max_length < 2:
      raise ValueError(f'model_max_length={model_max_length}: a row needs at least the start and '
                       'end tokens.')
    self.model_max_length = int(model_max_length)
    specials = {}
    for name, value in zip(_SPECIAL_NAMES, (bos_token, eos_token, unk_token, pad_token)):
      specials[name] = value if isinstance(value, AddedToken) else _token(value, special=True)
    bpe = tokenizers.models.BPE(vocab=dict(vocab), merges=[tuple(m) for m in merges],
                                continuing_subword_prefix='', end_of_word_suffix=END_OF_WORD,
                                fuse_unk=False, unk_token=specials['unk_token'].content)
    tok = tokenizers.Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r'\s+'), ' '), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior='removed', invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    size = tok.get_vocab_size(with_added_tokens=False)
    for token_id, token in sorted(added_tokens, key=lambda item: item[0]):
      if token_id < size or token.content in vocab:
        continue  # in the vocabulary already; specials are registered below
      if token_id != tok.get_vocab_size(with_added_tokens=True):
        raise ValueError(f'added token {token.content!r} has id {token_id}, but the next free id '
                         f'is {tok.get_vocab_size(with_added_tokens=True)}: the added tokens do '
                         'not follow the vocabulary.')
      (tok.add_special_tokens if token.special else tok.add_tokens)([token])
    seen = set()
    for name, token in specials.items():
      if token.content not in seen:
        seen.add(token.content)
        tok.add_special_tokens([token])
    self._tokenizer = tok
    self.special_tokens = {name: t.content for name, t in specials.items()}
    ids = {name: tok.token_to_id(t.content) for name, t in specials.items()}
    missing = [self.special_tokens[n] for n, i in ids.items() if i is None]
    if missing:
      raise ValueError(f'special tokens {missing} are not in the vocabulary.')
    self.bos_token_id = ids['bos_token']
    self.eos_token_id = ids['eos_token']
    self.unk_token_id = ids['unk_token']
    self.pad_token_id = ids['pad_token']

  @classmethod
  def from_directory(cls, directory: str | epath.PathLike) -> CLIPTokenizer:
    """The tokenizer saved in ``directory`` (diffusers' ``tokenizer/``, ``tokenizer_2/``).

    Reads the vocabulary and merges from ``tokenizer.json`` when present (what transformers 5
    writes), else from ``vocab.json`` + ``merges.txt``; the special tokens and
    ``model_max_length`` from ``tokenizer_config.json``, overridden by ``special_tokens_map.json``
    when the config has no ``added_tokens_decoder`` (the precedence of transformers, which makes
    SD 2.x pad with ``!``); added tokens from ``added_tokens_decoder``, ``tokenizer.json`` or
    ``added_tokens.json``.

    Raises:
      FileNotFoundError: neither ``tokenizer.json`` nor both ``vocab.json`` and ``merges.txt``.
      ValueError: unreadable files (naming the file).
    """
    directory = epath.Path(directory)
    config = _read_json(directory / 'tokenizer_config.json') or {}
    tokenizer_json = _read_json(directory / 'tokenizer.json')
    if tokenizer_json is not None:
      model = tokenizer_json.get('model') or {}
      if model.get('type', 'BPE') != 'BPE' or 'vocab' not in model:
        raise ValueError(f'{directory / "tokenizer.json"} holds no BPE model.')
      vocab = model['vocab']
      merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m)
                for m in model.get('merges', [])]
      file_added = [(int(t['id']), _token(t, special=bool(t.get('special'))))
                    for t in tokenizer_json.get('added_tokens', [])]
    elif (directory / 'vocab.json').exists() and (directory / 'merges.txt').exists():
      vocab = _read_json(directory / 'vocab.json')
      merges = []
      for line in (directory / 'merges.txt').read_text(encoding='utf-8').split('\n'):
        if line.startswith('#version') or not line.strip():
          continue
        pair = tuple(line.split())
        if len(pair) != 2:
          raise ValueError(f'{directory / "merges.txt"}: line {line!r} is not a pair of tokens.')
        merges.append(pair)
      file_added = []
    else:
      found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else None
      raise FileNotFoundError(
          f'no CLIP tokenizer in {directory}: expected vocab.json and merges.txt (or '
          f'tokenizer.json); {"it holds " + str(found) if found is not None else "no directory"}.')

    specials = {name: config.get(name) for name in _SPECIAL_NAMES}
    if 'added_tokens_decoder' in config:
      added = [(int(i), _token(t, special=bool(t.get('special'))))
               for i, t in config['added_tokens_decoder'].items()]
    else:
      for name, value in (_read_json(directory / 'special_tokens_map.json') or {}).items():
        if name in specials:
          specials[name] = value
      added = file_added
      legacy = _read_json(directory / 'added_tokens.json') or {}
      added += [(int(i), AddedToken(t, special=False, normalized=True)) for t, i in legacy.items()]
    defaults = {'bos_token': BOS, 'eos_token': EOS, 'unk_token': EOS, 'pad_token': EOS}
    by_content = {t.content: t for _, t in added if t.special}
    tokens = {}
    for name, value in specials.items():
      value = defaults[name] if value is None else value
      content = value if isinstance(value, str) else value.get('content')
      # A special token listed in added_tokens_decoder / tokenizer.json keeps its flags there.
      tokens[name] = by_content.get(content) or _token(value, special=True)
    max_length = config.get('model_max_length')
    if not isinstance(max_length, int) or max_length > 1_000_000:
      max_length = DEFAULT_MAX_LENGTH
    return cls(vocab, merges, **tokens, model_max_length=max_length, added_tokens=added)

  # --- encoding ----------------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """Size of the BPE vocabulary, without added tokens (as transformers' ``vocab_size``)."""
    return self._tokenizer.get_vocab_size(with_added_tokens=False)

  def __len__(self) -> int:
    """Ids in use, added tokens included: the rows the text model's token embedding needs."""
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def tokenize(self, text: str) -> list[str]:
    """The BPE tokens of ``text`` (no start/end tokens), e.g. ``['a</w>', 'photo</w>']``."""
    return self._tokenizer.encode(text, add_special_tokens=False).tokens

  def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int] | None:
    """Id of a token (or ids of tokens); None for an unknown token."""
    if isinstance(tokens, str):
      return self._tokenizer.token_to_id(tokens)
    return [self._tokenizer.token_to_id(t) for t in tokens]

  def encode(self, prompts: str | Sequence[str], *, max_length: int | None = None,
             padding: str = 'max_length', truncation: bool = True) -> Encoding:
    """Token ids of ``prompts`` with the truncation count (see ``Encoding``).

    Args:
      prompts: one prompt or a sequence of B.
      max_length: row length; default ``model_max_length`` (77).
      padding: ``'max_length'`` (every row ``max_length`` long, as SD pipelines) or
        ``'longest'`` (rows as long as the longest prompt, at most ``max_length`` when
        truncating).
      truncation: keep the first ``max_length - 2`` tokens of longer prompts (then the end
        token). False keeps every token and raises when a prompt is longer than the rows.

    Returns:
      An ``Encoding``: ``input_ids int32 [B, L]``, ``num_tokens``, ``truncated``.

    Raises:
      ValueError: an unknown ``padding``, ``max_length < 2``, a prompt that is not a string, or
        (``truncation=False``) a prompt longer than ``max_length`` with ``padding='max_length'``.
    """
    if isinstance(prompts, str):
      prompts = [prompts]
    prompts = list(prompts)
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
      raise ValueError(f'prompts must be strings; got {bad[:3]}.')
    if padding not in PADDINGS:
      raise ValueError(f'padding={padding!r} is not known; use one of {PADDINGS}.')
    max_length = self.model_max_length if max_length is None else int(max_length)
    if max_length < 2:
      raise ValueError(f'max_length={max_length}: a row needs at least the start and end tokens.')
    encoded = self._tokenizer.encode_batch(prompts, add_special_tokens=False)
    rows = [[self.bos_token_id, *e.ids, self.eos_token_id] for e in encoded]
    num_tokens = np.array([len(r) for r in rows], np.int32).reshape(len(rows))
    truncated = num_tokens > max_length
    if truncation:
      rows = [r if len(r) <= max_length else r[:max_length - 1] + [self.eos_token_id]
              for r in rows]
    elif padding == 'max_length' and truncated.any():
      raise ValueError(f'prompt {int(np.argmax(truncated))} has {int(num_tokens.max())} tokens, '
                       f'more than max_length={max_length}, and truncation=False: truncate, or '
                       "pad to the longest prompt (padding='longest').")
    length = max_length if padding == 'max_length' else max((len(r) for r in rows), default=2)
    ids = np.full((len(rows), length), self.pad_token_id, np.int32)
    for i, r in enumerate(rows):
      ids[i, :len(r)] = r
    return Encoding(ids, num_tokens, truncated)

  def __call__(self, prompts: str | Sequence[str], *, max_length: int | None = None,
               padding: str = 'max_length', truncation: bool = True) -> np.ndarray:
    """``encode(...).input_ids``: ``int32 [B, max_length]``, as diffusers' pipelines tokenize."""
    return self.encode(prompts, max_length=max_length, padding=padding,
                       truncation=truncation).input_ids

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
    """The text of ``ids`` (lower-cased and space-normalized, as the tokenizer saw it)."""
    text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
    return text.replace(END_OF_WORD, ' ').strip()

  # --- textual inversion --------------------------------------------------------------------

  def add_tokens(self, tokens: str | Sequence[str]) -> list[int]:
    """Adds placeholder tokens (textual inversion) and returns their new ids, in order.

    Tokens are matched in prompts after lower-casing and before BPE (as transformers'
    ``add_tokens``), and take the ids after the vocabulary; the text model's token embedding
    needs the matching new rows.

    Raises:
      ValueError: a token that is already in the vocabulary or added, or given twice.
    """
    tokens = [tokens] if isinstance(tokens, str) else list(tokens)
    known = [t for t in tokens if self._tokenizer.token_to_id(t) is not None]
    if known or len(set(tokens)) != len(tokens):
      raise ValueError(f'cannot add tokens {known or tokens}: already in the tokenizer or given '
                       'twice; choose placeholder strings that are new.')
    self._tokenizer.add_tokens([AddedToken(t, special=False, normalized=True) for t in tokens])
    return [self._tokenizer.token_to_id(t) for t in tokens]


def _read_json(path: epath.Path) -> Any:
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text(encoding='utf-8'))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from e


__all__ = ['BOS', 'DEFAULT_MAX_LENGTH', 'END_OF_WORD', 'EOS', 'Encoding', 'PATTERN', 'PADDINGS',
           'CLIPTokenizer']
