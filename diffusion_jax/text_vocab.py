"""A word-level vocabulary built from the captions, for text encoders trained from scratch.

Latent diffusion with a small text transformer trained jointly (Rombach et al. 2022, the LDM
text-to-image model) needs no pretrained BPE: a vocabulary of the words the captions use is enough.
`build_vocab` makes one with the Hugging Face ``tokenizers`` library (a ``WordLevel`` model):

* normalization: NFKC, then lowercase;
* pre-tokenization: ``Whitespace`` (runs of word characters ``\\w+``, and runs of punctuation
  ``[^\\w\\s]+`` as their own words), so ``'the digit seven.'`` is ``the digit seven .``;
* ids: ``[PAD]`` = 0, ``[UNK]`` = 1, ``[BOS]`` = 2, ``[EOS]`` = 3, then the words in
  alphabetical order (the ids depend only on the set of words, not on counts or caption order);
* every prompt is ``[BOS] words [EOS]``, padded with ``[PAD]`` to ``max_length``; a longer one
  keeps its first ``max_length - 2`` words and still ends in ``[EOS]`` (as CLIP's tokenizer does),
  and is counted in `WordTokenizer.num_truncated`.

The empty prompt is ``[BOS] [EOS] [PAD] ...``: the unconditional prompt of classifier-free
guidance. The interface is that of the CLIP tokenizer (``tokenization.CLIPTokenizer``), so the
two are interchangeable: ``tok(prompts, *, max_length=None) -> int32 [B, L]``,
``tok.encode(...) -> tokenization.Encoding`` (ids, tokens per prompt, which were truncated),
``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``, ``model_max_length``, ``vocab_size``.

The whole tokenizer, its default length included, is one ``tokenizer.json`` (``save`` / ``load``,
through ``etils.epath``: local paths or ``gs://``); ``transformers.PreTrainedTokenizerFast``
reads the same file.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Sequence

import numpy as np
from absl import logging
from etils import epath
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

from diffusion_jax import tokenization

PAD, UNK, BOS, EOS = '[PAD]', '[UNK]', '[BOS]', '[EOS]'
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0, 1, 2, 3
FILENAME = 'tokenizer.json'


class WordTokenizer:
  """Prompts -> padded int32 token ids over a fixed word vocabulary.

  Attributes:
    tokenizer: The underlying ``tokenizers.Tokenizer``.
    model_max_length: Default length L of `__call__` (``[BOS]`` and ``[EOS]`` included).
    num_truncated: Prompts cut to fit `max_length` since this object was made (all calls).
    num_unknown: Words not in the vocabulary (mapped to ``[UNK]``) since this object was made.
  """

  def __init__(self, tokenizer: Tokenizer, *, model_max_length: int):
    _check_max_length(model_max_length)
    vocab = tokenizer.get_vocab()
    for i, token in enumerate(SPECIAL_TOKENS):
      if vocab.get(token) != i:
        raise ValueError(f'A word tokenizer needs {token} at id {i}; this one has '
                         f'{token} -> {vocab.get(token)}. Build it with build_vocab.')
    self.tokenizer = tokenizer
    self.model_max_length = int(model_max_length)
    self.num_truncated = 0
    self.num_unknown = 0

  @property
  def vocab_size(self) -> int:
    """Number of ids, the four special tokens included (the embedding table's rows)."""
    return self.tokenizer.get_vocab_size()

  @property
  def pad_token_id(self) -> int:
    return 0

  @property
  def unk_token_id(self) -> int:
    return 1

  @property
  def bos_token_id(self) -> int:
    return 2

  @property
  def eos_token_id(self) -> int:
    return 3

  def __len__(self) -> int:
    return self.vocab_size

  def vocab(self) -> dict[str, int]:
    """Token -> id, special tokens included."""
    return self.tokenizer.get_vocab()

  def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int] | None:
    """Id of a word (or ids of words); None for a word outside the vocabulary."""
    if isinstance(tokens, str):
      return self.tokenizer.token_to_id(tokens)
    return [self.tokenizer.token_to_id(t) for t in tokens]

  def tokenize(self, text: str) -> list[str]:
    """The words of ``text`` as tokens (``[UNK]`` for words outside the vocabulary)."""
    return self.tokenizer.encode(text, add_special_tokens=False).tokens

  def add_tokens(self, tokens: str | Sequence[str]) -> list[int]:
    """Adds placeholder words (textual inversion) and returns their new ids, in order.

    A placeholder is matched in prompts after normalization (lower-cased) and before the
    pre-tokenizer, so ``'<new>'`` stays one token; its id follows the vocabulary, and the text
    encoder's token table needs the matching new rows
    (``adapters.textual_inversion.add_embeddings``). ``save`` keeps the added words.

    Raises:
      ValueError: a token already in the vocabulary or added, given twice, or not lower case
        (prompts are lower-cased before matching, so it could never match).
    """
    tokens = [tokens] if isinstance(tokens, str) else list(tokens)
    known = [t for t in tokens if self.tokenizer.token_to_id(t) is not None]
    if known or len(set(tokens)) != len(tokens):
      raise ValueError(f'cannot add tokens {known or tokens}: already in the vocabulary or '
                       'given twice; choose placeholder strings that are new.')
    upper = [t for t in tokens if t != t.lower()]
    if upper:
      raise ValueError(f'placeholder {upper[0]!r} has upper-case letters; prompts are '
                       f'lower-cased before matching: use {upper[0].lower()!r}.')
    self.tokenizer.add_tokens([AddedToken(t, special=False, normalized=True) for t in tokens])
    return [self.tokenizer.token_to_id(t) for t in tokens]

  def words(self, prompt: str) -> list[str]:
    """The words of `prompt` as the vocabulary sees them (normalized, pre-tokenized)."""
    return _words(self.tokenizer, prompt)

  def encode(self, prompts: str | Sequence[str], *, max_length: int | None = None,
             padding: str = 'max_length', truncation: bool = True) -> tokenization.Encoding:
    """Tokenizes prompts, with what truncation did.

    Args:
      prompts: One prompt or a sequence of B prompts ('' is the unconditional prompt).
      max_length: Row length L, ``[BOS]`` and ``[EOS]`` included (>= 2); None uses
        `model_max_length`.
      padding: ``'max_length'`` (every row L long) or ``'longest'`` (rows as long as the
        longest prompt, at most L when truncating).
      truncation: Keep the first L - 2 words of longer prompts, then ``[EOS]``; False keeps
        every word (and raises if a prompt is longer than L with ``padding='max_length'``).

    Returns:
      ``tokenization.Encoding``: ``input_ids`` int32 [B, L] (``[BOS] ids [EOS] [PAD] ...``; B = 1
      for a single string), ``num_tokens`` int32 [B] (before truncation, ``[BOS]``/``[EOS]``
      included), ``truncated`` bool [B]. Truncated prompts are logged and counted in
      `num_truncated`; words outside the vocabulary become ``[UNK]`` (logged, counted in
      `num_unknown`).

    Raises:
      ValueError: If a prompt is not a string, `max_length` < 2, `padding` is unknown, or a
        prompt is longer than L with ``truncation=False`` and ``padding='max_length'``.
    """
    if isinstance(prompts, str):
      prompts = [prompts]
    prompts = list(prompts)
    for p in prompts:
      if not isinstance(p, str):
        raise ValueError(f'Prompts must be strings; got {type(p).__name__} {p!r}.')
    if padding not in tokenization.PADDINGS:
      raise ValueError(f'padding={padding!r} is not known; use one of {tokenization.PADDINGS}.')
    length = self.model_max_length if max_length is None else max_length
    _check_max_length(length)
    rows, unknown = [], set()
    for prompt, encoding in zip(
        prompts, self.tokenizer.encode_batch(prompts, add_special_tokens=False)):
      words = encoding.ids
      if self.unk_token_id in words:
        unknown.update(prompt[a:b] for (a, b), i in zip(encoding.offsets, words)
                       if i == self.unk_token_id)
        self.num_unknown += sum(i == self.unk_token_id for i in words)
      rows.append([self.bos_token_id, *words, self.eos_token_id])
    num_tokens = np.array([len(r) for r in rows], np.int32).reshape(len(rows))
    truncated = num_tokens > length
    if truncation:
      rows = [r if len(r) <= length else r[:length - 1] + [self.eos_token_id] for r in rows]
    elif padding == 'max_length' and truncated.any():
      raise ValueError(
          f'Prompt {int(np.argmax(truncated))} has {int(num_tokens.max())} tokens, more than '
          f"max_length={length}, and truncation=False: truncate, or use padding='longest'.")
    else:
      truncated = np.zeros_like(truncated)  # nothing was cut
    width = length if padding == 'max_length' else max((len(r) for r in rows), default=2)
    ids = np.full((len(rows), width), self.pad_token_id, np.int32)
    for i, r in enumerate(rows):
      ids[i, :len(r)] = r
    if truncated.any():
      self.num_truncated += int(truncated.sum())
      logging.warning('%d prompt(s) longer than %d tokens were truncated, e.g. %r.',
                      int(truncated.sum()), length, prompts[int(np.argmax(truncated))])
    if unknown:
      logging.warning('Words not in the vocabulary (tokenized as %s): %s.', UNK,
                      ', '.join(sorted(unknown)))
    return tokenization.Encoding(ids, num_tokens, truncated)

  def __call__(self, prompts: str | Sequence[str], *, max_length: int | None = None,
               padding: str = 'max_length', truncation: bool = True) -> np.ndarray:
    """``encode(...).input_ids``: int32 [B, L]; see `encode`."""
    return self.encode(prompts, max_length=max_length, padding=padding,
                       truncation=truncation).input_ids

  def decode(self, ids: np.ndarray | Sequence[int]) -> str:
    """Token ids (one row) back to the words, special tokens dropped, joined by spaces."""
    return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                 skip_special_tokens=True)

  def save(self, path: str | epath.PathLike) -> epath.Path:
    """Writes ``tokenizer.json`` (into `path` if it is a directory, else to `path`).

    Returns:
      The file written.
    """
    path = epath.Path(path)
    if path.is_dir():
      path = path / FILENAME
    data = json.loads(self.tokenizer.to_str())
    # The default length travels in the file as its truncation/padding settings, so that the
    # file alone (or PreTrainedTokenizerFast over it) rebuilds this tokenizer.
    data['truncation'] = {'direction': 'Right', 'max_length': self.model_max_length,
                          'strategy': 'LongestFirst', 'stride': 0}
    data['padding'] = {'strategy': {'Fixed': self.model_max_length}, 'direction': 'Right',
                       'pad_to_multiple_of': None, 'pad_id': self.pad_token_id,
                       'pad_type_id': 0, 'pad_token': PAD}
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1))
    return path


def build_vocab(captions: Iterable[str], *, max_length: int | None = None,
                min_count: int = 1) -> WordTokenizer:
  """Builds a word-level tokenizer from captions.

  Args:
    captions: The training captions (any order; repeats allowed; '' allowed).
    max_length: Default row length of the tokenizer (``[BOS]``/``[EOS]`` included); None takes
      the longest caption's word count + 2.
    min_count: Words seen fewer times than this map to ``[UNK]``.

  Returns:
    The `WordTokenizer`.

  Raises:
    ValueError: If a caption is not a string, or no caption has a word kept.
  """
  if not isinstance(min_count, int) or min_count < 1:
    raise ValueError(f'min_count must be a positive integer, got {min_count!r}.')
  tokenizer = _empty_tokenizer({t: i for i, t in enumerate(SPECIAL_TOKENS)})
  counts = collections.Counter()
  longest = 0
  for caption in captions:
    if not isinstance(caption, str):
      raise ValueError(f'Captions must be strings; got {type(caption).__name__} {caption!r}.')
    words = _words(tokenizer, caption)
    counts.update(words)
    longest = max(longest, len(words))
  kept = sorted(w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS)
  if not kept:
    raise ValueError(f'No word occurs >= {min_count} time(s) in the captions; a vocabulary '
                     'needs at least one (are all captions empty?).')
  vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
  vocab.update({w: len(SPECIAL_TOKENS) + i for i, w in enumerate(kept)})
  return WordTokenizer(_empty_tokenizer(vocab),
                       model_max_length=longest + 2 if max_length is None else max_length)


def load(path: str | epath.PathLike) -> WordTokenizer:
  """Reads a tokenizer saved by `WordTokenizer.save` (a ``tokenizer.json`` or its directory).

  Raises:
    FileNotFoundError: No such file.
    ValueError: The file is not a word-level tokenizer of this module.
  """
  path = epath.Path(path)
  if path.is_dir():
    path = path / FILENAME
  if not path.exists():
    raise FileNotFoundError(f'No tokenizer file {path}; write one with WordTokenizer.save.')
  text = path.read_text()
  try:
    data = json.loads(text)
    tokenizer = Tokenizer.from_str(text)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path} is not a tokenizers JSON file: {e}') from e
  if data.get('model', {}).get('type') != 'WordLevel':
    raise ValueError(f'{path} holds a {data.get("model", {}).get("type")} model, not the '
                     'WordLevel vocabulary of text_vocab.build_vocab.')
  max_length = (data.get('truncation') or {}).get('max_length')
  if max_length is None:
    raise ValueError(f'{path} has no truncation.max_length (the default prompt length); '
                     'save it with WordTokenizer.save.')
  # Padding and truncation are done by __call__, not by the library.
  tokenizer.no_padding()
  tokenizer.no_truncation()
  return WordTokenizer(tokenizer, model_max_length=max_length)


def _empty_tokenizer(vocab: dict[str, int]) -> Tokenizer:
  tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  # Only for users of the file (PreTrainedTokenizerFast); __call__ adds BOS/EOS itself so that
  # truncation keeps the EOS.
  tokenizer.post_processor = processors.TemplateProcessing(
      single=f'{BOS} $A {EOS}', special_tokens=[(BOS, 2), (EOS, 3)])
  tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
  return tokenizer


def _words(tokenizer: Tokenizer, text: str) -> list[str]:
  normalized = tokenizer.normalizer.normalize_str(text)
  return [w for w, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized)]


def _check_max_length(max_length) -> None:
  if not isinstance(max_length, (int, np.integer)) or max_length < 2:
    raise ValueError(f'max_length must be an integer >= 2 ([BOS] and [EOS] take two), got '
                     f'{max_length!r}.')
