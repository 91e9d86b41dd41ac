"""BLIP text front-end (docs/method.md#tokenizer): caption cleaning and an offline BERT WordPiece tokenizer.

Two caption cleaners exist in the reference code; each is used in one place (docs/decisions.md item 19):

  pre_caption_blip       BLIP `data/utils.pre_caption`: COCO / VG / CC pre-training captions.
  pre_caption_imagecode  ContextBLIP `utils.pre_caption`: every IMAGECODE description (zero-shot,
                         fine-tuning, evaluation, the `score` command).

`BlipTokenizer` reproduces `BertTokenizer('bert-base-uncased', do_lower_case=True)` plus BLIP's
added `[DEC]` (30522) and `[ENC]` (30523), i.e. `len(tokenizer) == 30524`, in pure Python:

  text -> split on special tokens written verbatim ("[SEP]", "[ENC]", ...)
       -> lower-case -> drop NUL / U+FFFD / control characters, whitespace -> " "
       -> spaces around CJK ideographs -> whitespace split
       -> per word: lower-case, strip accents (NFD, drop Mn), split off punctuation
       -> greedy longest-match WordPiece ("##" continuation; words > 100 chars -> [UNK])

and pads / truncates like `tokenizer(texts, padding='max_length', truncation=True,
max_length=30)`: `[CLS] w_1 .. w_k [SEP] [PAD] ..` with at most 28 word pieces kept.
Word -> ids results are cached, so re-tokenising a corpus costs little more than a dict lookup.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np

from contextblip_jax.storage import paths

VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                          "bert-base-uncased-vocab.txt")
VOCAB_MD5 = "64800d5d8528ce344256daf115d4965e"   # bert-base-uncased, 30,522 lines

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
DEC, ENC = "[DEC]", "[ENC]"                       # BLIP's added tokens
DEFAULT_MAX_LENGTH = 30                           # T used everywhere in ContextBLIP
MAX_INPUT_CHARS_PER_WORD = 100                    # longer words become [UNK]

# --------------------------------------------------------------------------- caption cleaning

_BLIP_PUNCT = re.compile(r"([.!\"()*#:;~])")
_IMAGECODE_PUNCT = re.compile(r"([,.'!?\"()*#:;~])")
_MULTI_SPACE = re.compile(r"\s{2,}")


def _finish_caption(caption: str, max_words: int | None) -> str:
  """Shared tail of both cleaners: collapse runs of whitespace, strip, keep <= max_words."""
  caption = _MULTI_SPACE.sub(" ", caption)
  caption = caption.rstrip("\n").strip(" ")
  if max_words is not None:
    words = caption.split(" ")
    if len(words) > max_words:
      caption = " ".join(words[:max_words])
  return caption


def pre_caption_blip(caption: str, max_words: int | None = 30) -> str:
  """BLIP `data/utils.pre_caption`: lower-case, each of .!"()*#:;~ -> space, keep <= max_words.

  Used for the pre-training captions (COCO, VG, CC/SBU). Words are counted by `split(' ')`
  after collapsing runs of two or more whitespace characters, exactly as the reference does.
  """
  return _finish_caption(_BLIP_PUNCT.sub(" ", caption.lower()), max_words)


def pre_caption_imagecode(caption: str, max_words: int | None = 30) -> str:
  """ContextBLIP `utils.pre_caption`: lower-case, delete ,.'!?"()*#:;~, '-' and '/' -> space.

  Used for every IMAGECODE description (zero-shot, fine-tuning, evaluation, scoring).
  """
  caption = _IMAGECODE_PUNCT.sub("", caption.lower()).replace("-", " ").replace("/", " ")
  return _finish_caption(caption, max_words)


# --------------------------------------------------------------------------- character classes
# Same definitions as BERT's reference BasicTokenizer.

def _is_whitespace(ch: str) -> bool:
  return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
  return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
  cp = ord(ch)
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True   # all non-alphanumeric ASCII counts as punctuation, '$' and '^' included
  return unicodedata.category(ch).startswith("P")


_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(ch: str) -> bool:
  cp = ord(ch)
  return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


# ASCII fast path of `_clean_text`: drop control characters, map \t \n \r to a space.
_ASCII_CLEAN = {cp: None for cp in range(32) if chr(cp) not in "\t\n\r"}
_ASCII_CLEAN.update({127: None, ord("\t"): " ", ord("\n"): " ", ord("\r"): " "})


def _clean_text(text: str) -> str:
  """Removes NUL, U+FFFD and control characters; every whitespace character becomes ' '."""
  if text.isascii():
    return text.translate(_ASCII_CLEAN)
  out = []
  for ch in text:
    if ch == "\x00" or ch == "\ufffd" or _is_control(ch):
      continue
    out.append(" " if _is_whitespace(ch) else ch)
  return "".join(out)


def _space_cjk(text: str) -> str:
  """Puts spaces around every CJK ideograph so each becomes its own word."""
  if text.isascii():
    return text
  return "".join(f" {ch} " if _is_cjk(ch) else ch for ch in text)


def _strip_accents(text: str) -> str:
  if text.isascii():
    return text
  return "".join(ch for ch in unicodedata.normalize("NFD", text)
                 if unicodedata.category(ch) != "Mn")


def _split_punctuation(word: str) -> list[str]:
  """'don't!' -> ['don', "'", 't', '!']: every punctuation character is a word of its own."""
  pieces, current = [], []
  for ch in word:
    if _is_punctuation(ch):
      if current:
        pieces.append("".join(current))
        current = []
      pieces.append(ch)
    else:
      current.append(ch)
  if current:
    pieces.append("".join(current))
  return pieces


# --------------------------------------------------------------------------- vocabulary

def file_md5(path: str) -> str:
  with paths.open(path, "rb") as f:
    return hashlib.file_digest(f, "md5").hexdigest()


def load_vocab(path: str, expected_md5: str | None = VOCAB_MD5) -> dict[str, int]:
  """Reads a WordPiece vocabulary (one token per line, id = line number) and checks its md5."""
  if not paths.isfile(path):                 # a local path or a gs:// URL (an export there)
    raise FileNotFoundError(f"vocabulary file not found: {path}")
  if expected_md5 is not None:
    got = file_md5(path)
    if got != expected_md5:
      raise ValueError(f"vocabulary file {path} has md5 {got}, expected {expected_md5} "
                       "(the bert-base-uncased WordPiece vocabulary BLIP was trained with)")
  vocab: dict[str, int] = {}
  with paths.open(path, encoding="utf-8") as f:
    for index, line in enumerate(f):
      vocab[line.rstrip("\n")] = index
  for tok in (PAD, UNK, CLS, SEP, MASK):
    if tok not in vocab:
      raise ValueError(f"vocabulary file {path} lacks the special token {tok}")
  return vocab


# --------------------------------------------------------------------------- tokenizer

class BlipTokenizer:
  """Offline bert-base-uncased WordPiece tokenizer with BLIP's [DEC] / [ENC] (30524 ids)."""

  def __init__(self, vocab_path: str | None = None, expected_md5: str | None = VOCAB_MD5,
               max_input_chars_per_word: int = MAX_INPUT_CHARS_PER_WORD):
    self.vocab_path = os.path.abspath(vocab_path or VOCAB_PATH)
    self.vocab = load_vocab(self.vocab_path, expected_md5)
    for tok in (DEC, ENC):            # added in this order by BLIP's init_tokenizer
      if tok not in self.vocab:
        self.vocab[tok] = len(self.vocab)
    self.ids_to_tokens = {i: t for t, i in self.vocab.items()}
    self.max_input_chars_per_word = max_input_chars_per_word
    self.pad_token_id = self.vocab[PAD]
    self.unk_token_id = self.vocab[UNK]
    self.cls_token_id = self.vocab[CLS]
    self.sep_token_id = self.vocab[SEP]
    self.mask_token_id = self.vocab[MASK]
    self.dec_token_id = self.vocab[DEC]
    self.enc_token_id = self.vocab[ENC]
    self.special_tokens = (PAD, UNK, CLS, SEP, MASK, DEC, ENC)
    self.special_ids = frozenset(self.vocab[t] for t in self.special_tokens)
    self._special_re = re.compile("(" + "|".join(re.escape(t) for t in self.special_tokens) + ")")
    self._word_cache: dict[str, tuple[int, ...]] = {}

  def __len__(self) -> int:
    return len(self.vocab)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  # -- text -> ids

  def _wordpiece(self, word: str) -> list[int]:
    """Greedy longest-match-first WordPiece of one punctuation-free word."""
    if len(word) > self.max_input_chars_per_word:
      return [self.unk_token_id]
    ids, start = [], 0
    while start < len(word):
      end, found = len(word), None
      while start < end:
        piece = word[start:end] if start == 0 else "##" + word[start:end]
        found = self.vocab.get(piece)
        if found is not None:
          break
        end -= 1
      if found is None:
        return [self.unk_token_id]
      ids.append(found)
      start = end
    return ids

  def _word_ids(self, word: str) -> tuple[int, ...]:
    """Ids of one whitespace-delimited word (cached)."""
    ids = self._word_cache.get(word)
    if ids is None:
      if word in self.special_tokens:
        ids = (self.vocab[word],)
      else:
        norm = _strip_accents(word.lower())
        ids = tuple(i for piece in _split_punctuation(norm) for i in self._wordpiece(piece))
      if len(self._word_cache) > 1_000_000:
        self._word_cache.clear()
      self._word_cache[word] = ids
    return ids

  def _chunk_ids(self, chunk: str) -> list[int]:
    # Lower-case the whole chunk first as transformers 4.26 (pinned by ContextBLIP) does.
    words = _space_cjk(_clean_text(chunk.lower())).split()
    return [i for w in words for i in self._word_ids(w)]

  def text_to_ids(self, text: str) -> list[int]:
    """Word-piece ids of `text` without [CLS] / [SEP] (no truncation)."""
    if not isinstance(text, str):
      raise TypeError(f"expected a str, got {type(text).__name__}: {text!r}")
    if "[" not in text:
      return self._chunk_ids(text)
    ids: list[int] = []
    for chunk in self._special_re.split(text):
      if chunk in self.special_tokens:
        ids.append(self.vocab[chunk])
      elif chunk:
        ids.extend(self._chunk_ids(chunk))
    return ids

  def tokenize(self, text: str) -> list[str]:
    """Word-piece strings of `text` (no [CLS] / [SEP])."""
    return self.convert_ids_to_tokens(self.text_to_ids(text))

  def encode(self, text: str, max_length: int | None = None,
             add_special_tokens: bool = True) -> list[int]:
    """`[CLS] ids [SEP]`, truncated (not padded) to `max_length` tokens when given."""
    ids = self.text_to_ids(text)
    reserve = 2 if add_special_tokens else 0
    if max_length is not None:
      if max_length < reserve + 1:
        raise ValueError(f"max_length must be >= {reserve + 1}, got {max_length}")
      ids = ids[:max_length - reserve]
    if add_special_tokens:
      ids = [self.cls_token_id] + ids + [self.sep_token_id]
    return ids

  def __call__(self, texts: str | Sequence[str],
               max_length: int = DEFAULT_MAX_LENGTH) -> dict[str, np.ndarray]:
    """Batch encode like HF `padding='max_length', truncation=True`.

    Returns {"input_ids": int32 [B, max_length], "attention_mask": int32 [B, max_length]}.
    """
    if isinstance(texts, str):
      texts = [texts]
    input_ids = np.full((len(texts), max_length), self.pad_token_id, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    for b, text in enumerate(texts):
      ids = self.encode(text, max_length)
      input_ids[b, :len(ids)] = ids
      mask[b, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}

  # -- ids -> text

  def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
    return [self.vocab.get(t, self.unk_token_id) for t in tokens]

  def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
    out = []
    for i in ids:
      i = int(i)
      if i not in self.ids_to_tokens:
        raise ValueError(f"token id {i} out of range for a vocabulary of {len(self)}")
      out.append(self.ids_to_tokens[i])
    return out

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Ids -> text: joins '##' continuations and tidies spaces before punctuation like HF."""
    ids = [int(i) for i in ids]
    if skip_special_tokens:
      ids = [i for i in ids if i not in self.special_ids]
    text = " ".join(self.convert_ids_to_tokens(ids)).replace(" ##", "").strip()
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                 (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
      text = text.replace(a, b)
    return text
