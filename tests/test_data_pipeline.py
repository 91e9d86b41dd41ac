"""Grain pipelines: formats, determinism, iterator state, per-process sharding, TFDS sources."""

import os
import pickle

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from contextblip_jax.data import preprocess
from contextblip_jax.data import imagecode as ic
from contextblip_jax.data import pairs as pairs_lib
from contextblip_jax.data import pipeline as P
from contextblip_jax.data import synthetic
from contextblip_jax.data import tfds_imagecode, tfds_pairs
from contextblip_jax.data.tokenizer import BlipTokenizer, pre_caption_imagecode

S = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("pipe") / "synth")
  synthetic.generate(root, seed=1, n_train_sets=12, n_valid_sets=7, n_test_sets=3, n_pairs=40,
                     image_size=S)
  return {"root": root, "tok": BlipTokenizer(),
          "train": ic.read_imagecode_dir(root, "train"),
          "valid": ic.read_imagecode_dir(root, "valid"),
          "pairs": pairs_lib.read_pairs(os.path.join(root, "pairs.json"))}


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
             for x, y in zip(a, b)) and len(a) == len(b)


def _train(data, **kw):
  args = dict(image_size=S, global_batch_size=4, seed=0, tokenizer=data["tok"])
  return P.imagecode_train_pipeline(data["train"], **{**args, **kw})


def test_pretrain_format_and_determinism(data):
  make = lambda seed: P.pretrain_pipeline(data["pairs"], image_size=S, global_batch_size=8,
                                          seed=seed, tokenizer=data["tok"])
  pipe = make(0)
  assert (pipe.steps_per_epoch, pipe.local_batch_size) == (5, 8)
  first = _take(iter(pipe), 12)                          # crosses two epoch boundaries
  b = first[0]
  assert sorted(b) == ["attention_mask", "image", "input_ids"]
  assert b["image"].shape == (8, S, S, 3) and b["image"].dtype == np.float32
  assert b["input_ids"].shape == (8, 30) and b["input_ids"].dtype == np.int32
  assert (b["input_ids"][:, 0] == data["tok"].cls_token_id).all()
  assert _same(first, _take(iter(make(0)), 12))
  assert not np.array_equal(first[0]["image"], _take(iter(make(1)), 1)[0]["image"])
  assert not np.array_equal(first[0]["image"], first[5]["image"])   # epoch 2 reshuffled


def test_imagecode_train_format(data):
  pipe = _train(data, num_epochs=1)
  n = len(data["train"].examples)
  assert pipe.steps_per_epoch == -(-n // 4) and pipe.num_records == n   # last batch kept
  batches = list(pipe)
  assert len(batches) == -(-n // 4)
  b = batches[0]
  assert sorted(b) == ["attention_mask", "example_mask", "images", "input_ids", "is_video",
                       "label"]
  assert b["images"].shape == (4, 10, S, S, 3) and b["images"].dtype == np.float32
  assert b["label"].dtype == np.int32 and b["is_video"].dtype == np.bool_
  # the 10 candidates of one example are augmented independently
  assert not np.array_equal(b["images"][0, 0], b["images"][0, 1])
  # labels/texts are those of real examples: each (input_ids, label) pair is in the split
  enc = P.TextEncoder(data["tok"], 30, pre_caption_imagecode)
  ids, _ = enc([e.description for e in data["train"].examples])
  known = {(tuple(i), e.label) for i, e in zip(ids.tolist(), data["train"].examples)}
  for b in batches:
    for i, label in zip(b["input_ids"].tolist(), b["label"].tolist()):
      assert (tuple(i), label) in known
  # eval-transform images of a record equal the plain loader's
  rec = P.ImagecodeExampleSource(data["train"])[0]
  out = P.LoadCandidates(P.augment.EvalTransform(S)).random_map(rec, np.random.default_rng(0))
  assert np.array_equal(out["images"], ic.load_candidates(rec["images"], S))


def test_iterator_state_resume(data, tmp_path):
  pipe = _train(data)
  it = iter(pipe)
  _take(it, pipe.steps_per_epoch - 1)
  state = it.get_state()
  expected = _take(it, 3)                                # crosses the epoch boundary
  it2 = iter(_train(data))
  it2.set_state(state)
  assert _same(_take(it2, 3), expected)
  # through Orbax with Grain's checkpoint handler
  it3 = iter(_train(data))
  _take(it3, 2)
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data_iter",),
                               item_handlers={"data_iter": grain.checkpoint.CheckpointHandler()})
  mngr.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it3)))
  mngr.wait_until_finished()
  want = _take(it3, 2)
  it4 = iter(_train(data))
  mngr.restore(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(it4)))
  assert _same(_take(it4, 2), want)
  mngr.close()


def test_process_sharding_covers_each_record_once():
  n, g = 23, 6
  base = grain.MapDataset.range(n).shuffle(seed=3)
  shards = [P.BatchRows(base, g, rows) for rows in ([0, 1, 2], [3, 4, 5])]
  for epoch in range(2):
    seen = [[shards[p][epoch * len(shards[p]) + j] for j in range(len(shards[p]))]
            for p in range(2)]
    flat = seen[0] + seen[1]
    assert len(flat) == len(set(flat)) == (n // g) * g        # disjoint, remainder dropped
    single = [base[epoch * n + i] for i in range((n // g) * g)]
    rebuilt = [x for b in range(n // g) for p in range(2) for x in seen[p][3 * b:3 * b + 3]]
    assert rebuilt == single                                  # same global batches
  with pytest.raises(ValueError, match="not within"):
    P.shard_rows(6, [0, 6])


def test_two_processes_see_the_one_process_batches(data):
  whole = _take(iter(_train(data)), 3)
  halves = [_take(iter(_train(data, shard=rows)), 3) for rows in ([0, 1], [2, 3])]
  for w, a, b in zip(whole, *halves):
    assert a["images"].shape[0] == 2
    for k in w:
      assert np.array_equal(w[k], np.concatenate([a[k], b[k]]))


def test_imagecode_eval_grouped_by_set(data):
  split = data["valid"]
  pipe = P.imagecode_eval_pipeline(split, image_size=S, sets_per_batch=3, tokenizer=data["tok"])
  batches = list(pipe)
  assert len(batches) == pipe.steps_per_epoch == -(-len(split.sets) // 3)
  d = max(len(s.example_indices) for s in split.sets)
  b = batches[0]
  assert b["images"].shape == (3, 10, S, S, 3) and b["input_ids"].shape == (3, d, 30)
  assert b["label"].shape == b["desc_mask"].shape == b["example_index"].shape == (3, d)
  sets = np.concatenate([x["set_index"][x["set_mask"]] for x in batches])
  assert sets.tolist() == list(range(len(split.sets)))
  ex = np.concatenate([x["example_index"][x["desc_mask"]] for x in batches])
  assert sorted(ex.tolist()) == list(range(len(split.examples)))
  for x in batches:
    assert (x["example_index"][~x["desc_mask"]] == -1).all()
    assert (x["label"][~x["desc_mask"]] == -1).all()
    for row in np.nonzero(x["set_mask"])[0]:
      s = split.sets[x["set_index"][row]]
      assert np.array_equal(x["images"][row], ic.load_candidates(s.image_paths, S))
      assert x["is_video"][row] == s.is_video
      for j, e in enumerate(s.example_indices):
        assert x["label"][row, j] == split.examples[e].label
    assert not x["images"][~x["set_mask"]].any()
  last = batches[-1]
  assert (~last["set_mask"]).sum() == len(batches) * 3 - len(split.sets)
  halves = [list(P.imagecode_eval_pipeline(split, image_size=S, sets_per_batch=4,
                                           tokenizer=data["tok"], shard=r))
            for r in ([0, 1], [2, 3])]
  assert len(halves[0]) == len(halves[1])                    # every process: same count
  seen = [i for h in halves for x in h for i in x["set_index"][x["set_mask"]].tolist()]
  assert sorted(seen) == list(range(len(split.sets)))


def test_sources_and_transforms_pickle(data):
  for obj in (P.PairSource(data["pairs"]), P.ImagecodeExampleSource(data["train"]),
              P.LoadCandidates(P.augment.make_train_transform(S, 0)),
              P.Tokenize(P.TextEncoder(data["tok"], 30, pre_caption_imagecode))):
    clone = pickle.loads(pickle.dumps(obj))
    assert type(clone) is type(obj)
  src = pickle.loads(pickle.dumps(P.ImagecodeExampleSource(data["train"])))
  assert src[0]["description"] == data["train"].examples[0].description


def test_tfds_builders_match_plain_readers(data, tmp_path):
  root = data["root"]
  builder = tfds_imagecode.build(root, str(tmp_path / "tfds"))
  sources = builder.as_data_source()
  assert sorted(sources) == ["test", "train", "valid"]
  for split in ("train", "valid", "test"):
    plain = {e.example_id: e for e in ic.read_imagecode_dir(root, split).examples}
    recs = [tfds_imagecode.decode_record(r) for r in sources[split]]
    assert sorted(r["example_id"] for r in recs) == sorted(plain)
    for r in recs:
      e = plain[r["example_id"]]
      assert (r["set_name"], r["description"], r["label"], r["is_video"], r["tags"],
              r["position"]) == (e.set_name, e.description, e.label, e.is_video, e.tags,
                                 e.position)
      assert r["image_names"] == tuple(os.path.basename(p) for p in e.image_paths)
      for blob, p in zip(r["image_bytes"], e.image_paths):
        with open(p, "rb") as f:
          assert blob == f.read()
  # a TFDS-backed source decodes to the plain reader's pixels and runs in the pipeline
  tsrc = tfds_imagecode.TfdsImagecodeSource(sources["train"])
  psrc = P.ImagecodeExampleSource(data["train"])
  by_id = {psrc[i]["id"]: i for i in range(len(psrc))}
  load = P.LoadCandidates(P.augment.make_train_transform(S, 0))
  t = tsrc[0]
  a = load.random_map(t, np.random.default_rng(9))
  b = load.random_map(psrc[by_id[t["id"]]], np.random.default_rng(9))
  assert np.array_equal(a["images"], b["images"]) and a["label"] == b["label"]
  pipe = P.imagecode_train_pipeline(pickle.loads(pickle.dumps(tsrc)), image_size=S,
                                    global_batch_size=4, seed=0, tokenizer=data["tok"])
  assert next(iter(pipe))["images"].shape == (4, 10, S, S, 3)
  reopened = tfds_imagecode.tfds.builder_from_directory(builder.data_dir)
  assert len(reopened.as_data_source()["valid"]) == len(data["valid"].examples)
  # pairs
  pb = tfds_pairs.build(root, str(tmp_path / "tfds"))
  psource = tfds_pairs.TfdsPairSource(pb.as_data_source()["train"])
  plain = {e.pair_id: e for e in data["pairs"].examples}
  assert sorted(psource[i]["id"] for i in range(len(psource))) == sorted(plain)
  r = psource[0]
  with open(plain[r["id"]].image_path, "rb") as f:
    assert r["image"] == f.read() and r["caption"] == plain[r["id"]].caption
  assert np.array_equal(np.asarray(P.open_image(r["image"])),
                        np.asarray(preprocess.open_rgb(plain[r["id"]].image_path)))
  pipe = P.pretrain_pipeline(psource, image_size=S, global_batch_size=8, seed=0,
                             tokenizer=data["tok"])
  assert next(iter(pipe))["image"].shape == (8, S, S, 3)


def test_image_cache_gives_identical_batches(data):
  assert _same(_take(iter(_train(data)), 2), _take(iter(_train(data, cache_images=True)), 2))
  kw = dict(image_size=S, sets_per_batch=4, tokenizer=data["tok"])
  assert _same(list(P.imagecode_eval_pipeline(data["valid"], **kw)),
               list(P.imagecode_eval_pipeline(data["valid"], cache_images=True, **kw)))
  kw = dict(image_size=S, global_batch_size=8, seed=0, tokenizer=data["tok"])
  assert _same(_take(iter(P.pretrain_pipeline(data["pairs"], **kw)), 2),
               _take(iter(P.pretrain_pipeline(data["pairs"], cache_images=True, **kw)), 2))


def test_eval_records(data):
  split = data["valid"]
  pipe = P.imagecode_eval_pipeline(split, image_size=S, sets_per_batch=4, tokenizer=data["tok"])
  records = []
  for b in pipe:
    # oracle scores: 1 at the gold candidate
    scores = np.zeros(b["label"].shape + (10,), np.float32)
    rows, cols = np.nonzero(b["desc_mask"])
    scores[rows, cols, b["label"][rows, cols]] = 1.0
    records += P.eval_records(split, b, scores)
  assert len(records) == len(split.examples)
  assert all(r["pred"] == r["gold"] for r in records)
  assert sorted((r["set"], r["index"]) for r in records) == sorted(
      (e.set_name, e.position) for e in split.examples)
  assert {r["static"] for r in records} == {True, False}


def test_batch_shapes_are_the_pipelines_batches(data):
  """`pipeline.batch_shapes` (what ahead-of-time compilation uses) = the real batches."""
  split = data["valid"]
  d = max(len(s.example_indices) for s in split.sets)
  real = {
      "pretrain": next(iter(P.pretrain_pipeline(data["pairs"], image_size=S, global_batch_size=8,
                                                seed=0, tokenizer=data["tok"]))),
      "finetune": next(iter(_train(data))),
      "eval": next(iter(P.imagecode_eval_pipeline(split, image_size=S, sets_per_batch=3,
                                                  tokenizer=data["tok"])))}
  sizes = {"pretrain": 8, "finetune": 4, "eval": 3}
  for kind, batch in real.items():
    want = P.batch_shapes(kind, sizes[kind], image_size=S, max_length=30, num_descriptions=d)
    got = {k: (v.shape, np.dtype(v.dtype)) for k, v in batch.items()}
    assert got == {k: (shape, np.dtype(dt)) for k, (shape, dt) in want.items()}, kind
  with pytest.raises(ValueError, match="unknown batch kind"):
    P.batch_shapes("stage3", 1, image_size=S, max_length=30)
