"""The offline BLIP tokenizer against transformers' BertTokenizer on real IMAGECODE text."""

import json
import os
import shutil

import numpy as np
import pytest
from transformers import BertTokenizer
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

from contextblip_jax.data import tokenizer as tk
from contextblip_jax.data.tokenizer import BlipTokenizer, pre_caption_blip, pre_caption_imagecode


def _blip_reference(cls, **kw):
  """transformers tokenizer set up like BLIP's init_tokenizer (+[DEC], +[ENC])."""
  ref = cls(do_lower_case=True, **kw)
  ref.add_special_tokens({"bos_token": "[DEC]"})
  ref.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
  # The vocabulary must really be loaded (transformers 5.x can silently ignore vocab files).
  assert len(ref) == 30524
  assert ref("a dog")["input_ids"] == [101, 1037, 3899, 102]
  return ref


@pytest.fixture(scope="module")
def tok():
  return BlipTokenizer()


@pytest.fixture(scope="module")
def ref_fast():
  return _blip_reference(BertTokenizer, vocab=tk.VOCAB_PATH)


@pytest.fixture(scope="module")
def ref_slow():
  """The pure-Python BertTokenizer (same algorithm as transformers 4.26, which BLIP pinned)."""
  return _blip_reference(BertTokenizerLegacy, vocab_file=tk.VOCAB_PATH)


@pytest.fixture(scope="module")
def valid_texts(imagecode_dir):
  with open(os.path.join(imagecode_dir, "valid_data.json")) as f:
    data = json.load(f)
  texts = [d for descs in data.values() for d in descs.values()]
  assert len(texts) == 2302
  return texts


def _ref_batch(ref, texts, max_length=30):
  out = ref(texts, padding="max_length", truncation=True, max_length=max_length,
            return_tensors="np")
  return out["input_ids"], out["attention_mask"]


@pytest.mark.parametrize("clean", [True, False], ids=["pre_caption", "raw"])
def test_valid_descriptions_match_transformers(tok, ref_fast, valid_texts, clean):
  texts = [pre_caption_imagecode(t) for t in valid_texts] if clean else valid_texts
  ours = tok(texts, max_length=30)
  assert ours["input_ids"].dtype == np.int32 and ours["input_ids"].shape == (2302, 30)
  ids, mask = _ref_batch(ref_fast, texts)
  np.testing.assert_array_equal(ours["input_ids"], ids)
  np.testing.assert_array_equal(ours["attention_mask"], mask)
  # Untruncated ids agree too (covers the words cut beyond 28 pieces).
  full = ref_fast(texts)["input_ids"]
  assert [tok.encode(t) for t in texts] == full
  # Real text, so hardly any unknowns: the vocabulary is in use.
  assert (ours["input_ids"] == tok.unk_token_id).sum() < 5


def test_valid_descriptions_match_slow_reference(tok, ref_slow, valid_texts):
  texts = valid_texts[:400]
  ids, mask = _ref_batch(ref_slow, texts)
  ours = tok(texts)
  np.testing.assert_array_equal(ours["input_ids"], ids)
  np.testing.assert_array_equal(ours["attention_mask"], mask)


EDGE_CASES = [
    "Café naïve RÉSUMÉ, Ångström",              # accents stripped after lower-casing
    "İstanbul straße ǅ ﬁ",                       # multi-char lower-case, ligatures
    "中文字 and 日本語 mixed中文",                 # CJK ideographs become single words
    "tab\there\nnew\r\x0bline\x7f\x00 \ufffd",   # control chars dropped, whitespace -> space
    "x\u2028y\u00a0z \u0301\u0301 a",            # unicode separators, lone combining marks
    "$5 ^ a|b `q` ~x <tag> don't!!",             # ASCII symbols count as punctuation
    "‘quote’ — dash… «fr» ¿qué?",                # unicode punctuation
    "a [SEP] b[ENC]c [sep] [DEC] [MASK]",        # special tokens written verbatim
    "x" * 100 + " " + "y" * 101,                 # 100 chars is a word, 101 is [UNK]
    "unaffable hyperparameterisation zzzzzzqqq",  # multi-piece words
    "🙂 emoji ☃",                                 # unknown symbols
    "",
    "   \n ",
]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_match_slow_reference(tok, ref_slow, text):
  assert tok.encode(text) == ref_slow(text)["input_ids"]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_match_fast_reference(tok, ref_fast, text):
  assert tok.encode(text) == ref_fast(text)["input_ids"]


def test_special_ids(tok):
  assert len(tok) == tok.vocab_size == 30524
  assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id,
          tok.mask_token_id) == (0, 100, 101, 102, 103)
  assert tok.dec_token_id == 30522 and tok.enc_token_id == 30523
  assert tok.convert_ids_to_tokens([30522, 30523]) == ["[DEC]", "[ENC]"]
  assert tok.encode("[ENC] a") == [101, 30523, 1037, 102]
  with pytest.raises(ValueError, match="out of range"):
    tok.convert_ids_to_tokens([30524])


def test_truncation_and_padding_at_30(tok):
  long_text = " ".join(["dog"] * 40)
  short = "a red car"
  out = tok([long_text, short, ""], max_length=30)
  ids, mask = out["input_ids"], out["attention_mask"]
  assert ids.shape == mask.shape == (3, 30) and mask.dtype == np.int32
  assert ids[0, 0] == 101 and ids[0, 29] == 102 and (ids[0, 1:29] == 3899).all()
  assert mask[0].all()
  assert list(ids[1, :5]) == [101, 1037, 2417, 2482, 102] and (ids[1, 5:] == 0).all()
  assert list(mask[1]) == [1] * 5 + [0] * 25
  assert list(ids[2, :2]) == [101, 102] and mask[2].sum() == 2
  assert tok("one", max_length=4)["input_ids"].tolist() == [[101, 2028, 102, 0]]
  assert tok.encode(long_text, max_length=5) == [101, 3899, 3899, 3899, 102]
  with pytest.raises(ValueError, match="max_length"):
    tok.encode("a", max_length=2)


def test_tokenize_and_decode_roundtrip(tok):
  assert tok.tokenize("Unaffable dogs!") == ["una", "##ffa", "##ble", "dogs", "!"]
  ids = tok(["The dog, on the left!"])["input_ids"][0]
  assert tok.decode(ids) == "the dog, on the left!"
  assert tok.decode(ids, skip_special_tokens=False).startswith("[CLS] the dog")
  assert tok.convert_tokens_to_ids(["dog", "notaword"]) == [3899, 100]


def test_vocab_md5_is_checked(tmp_path):
  bad = tmp_path / "vocab.txt"
  shutil.copyfile(tk.VOCAB_PATH, bad)
  with open(bad, "a") as f:
    f.write("[EXTRA_TOKEN]\n")
  with pytest.raises(ValueError, match=r"vocab\.txt has md5 .* expected 64800d5d"):
    BlipTokenizer(str(bad))
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    BlipTokenizer(str(tmp_path / "missing.txt"))
  # An explicitly unchecked vocabulary loads; the added tokens follow its last id.
  t = BlipTokenizer(str(bad), expected_md5=None)
  assert len(t) == 30525 and t.enc_token_id == 30524


def test_pre_caption_imagecode():
  raw = "The man's hand (left) is BLURRY -- half-way/up; #2: \"wow\"?!\n"
  assert pre_caption_imagecode(raw) == "the mans hand left is blurry half way up 2 wow"
  assert pre_caption_imagecode("a,b.c'd!e?f") == "abcdef"
  words = " ".join(f"w{i}" for i in range(40))
  assert pre_caption_imagecode(words).split(" ") == [f"w{i}" for i in range(30)]
  assert pre_caption_imagecode(words, max_words=5) == "w0 w1 w2 w3 w4"
  assert pre_caption_imagecode("  a   b  ") == "a b"


def test_pre_caption_blip():
  raw = "A man's hand (left). Is BLURRY, half-way/up; #2: \"wow\"!~\n"
  # BLIP keeps , ' - / ? and maps .!"()*#:;~ to spaces.
  assert pre_caption_blip(raw) == "a man's hand left is blurry, half-way/up 2 wow"
  assert pre_caption_blip("what?") == "what?"
  words = " ".join(f"w{i}" for i in range(40))
  assert len(pre_caption_blip(words).split(" ")) == 30
  assert len(pre_caption_blip(words, max_words=50).split(" ")) == 40
  # Only runs of >= 2 whitespace collapse; a single tab stays inside a "word" as in BLIP.
  assert pre_caption_blip("a\tb  c") == "a\tb c"

