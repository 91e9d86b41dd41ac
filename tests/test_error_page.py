"""The error-analysis page (`evaluation/error_page.py`): built from a generated IMAGECODE-layout
dataset and a predictions file with known correct / wrong / skipped rows (no model), checked in
headless Chromium through the page's own controls and URL hash, and without a browser for
thumbnail reuse, the skipped list and bad input.

The browser test needs Chromium: `bash tests/install_browser.sh`, or
CONTEXTBLIP_CHROMIUM=/path/to/chromium. Without one it fails (it is never skipped)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from contextblip_jax.data import imagecode, synthetic
from contextblip_jax.evaluation import accuracy, error_page, outputs, visualize
from contextblip_jax.evaluation.error_page import ErrorPageError, PageInputs
from tests.helpers import browser

SKIP_REASON = "image-set directory not found"


def _records(split: imagecode.ImagecodeSplit) -> list[dict]:
  """Scored records, every third one wrong (pred = gold + 1), plus one skipped description."""
  recs = []
  for n, e in enumerate(split.examples):
    wrong = n % 3 == 1
    pred = (e.label + 1) % 10 if wrong else e.label
    scores = [float(-abs(k - pred)) for k in range(10)]
    recs.append({"set": e.set_name, "index": e.position, "description": e.description,
                 "static": not e.is_video, "gold": e.label, "pred": pred, "scores": scores})
  recs.append({"set": "synthvideo-gone", "index": 0, "description": "a set whose images vanished",
               "static": False, "gold": 3, "pred": None, "scores": None,
               "skipped": SKIP_REASON})
  return recs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """data/ (generated), predictions file, propositions for two descriptions, overlays for two."""
  root = tmp_path_factory.mktemp("error_page")
  data = str(root / "data")
  synthetic.generate(data, seed=0, n_train_sets=1, n_valid_sets=8, n_test_sets=1, n_pairs=2)
  split = imagecode.read_imagecode_dir(data, "valid")
  recs = _records(split)
  pred = str(root / "eval" / "stage2_valid.predictions.jsonl")
  outputs.write_predictions(pred, recs)
  props = str(root / "valid_split.json")
  with open(props, "w") as f:
    json.dump({split.examples[0].description: ["a", "b"],
               split.examples[1].description: ["a", "b", "c"]}, f)
  chosen = split.examples[:2]
  rng = np.random.default_rng(0)
  visualize.save_overlays(str(root / "eval" / "stage2_attention_overlays"), chosen,
                          rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8),
                          rng.random((2, 4, 4)), rng.random((2, 4, 4)) > 0.7)
  inp = PageInputs(pred, data, str(root / "page"), propositions=props,
                   overlays=str(root / "eval" / "stage2_attention_overlays"))
  page = error_page.build_page(inp, log=lambda _: None)
  return {"root": root, "data": data, "split": split, "recs": recs, "pred": pred,
          "inp": inp, "page": page, "props": props}


def _expected(recs, outcome="all", kind="all", tag="all", tags=None) -> list[str]:
  """Row ids ('r<n>') the page must show for a filter, computed from the predictions."""
  out = []
  for n, r in enumerate(x for x in recs if x["pred"] is not None):
    ok = r["pred"] == r["gold"]
    t = (tags or {}).get((r["set"], r["gold"]), ())
    if ((outcome == "all" or (outcome == "correct") == ok)
        and (kind == "all" or (kind == "static") == r["static"])
        and (tag == "all" or tag in t)):
      out.append(f"r{n}")
  return out


_VISIBLE = "Array.from(document.querySelectorAll('#rows .row')).filter(r => !r.hidden)" \
           ".map(r => r.id)"
_COUNTER = "document.getElementById('counter').textContent"


def _set(b: browser.Browser, control: str, value: str, event: str = "change") -> None:
  b.evaluate(f"(() => {{ const c = document.getElementById({control!r}); c.value = {value!r}; "
             f"c.dispatchEvent(new Event({event!r})); }})()")


def test_page_filters_and_thumbnails_in_chromium(run):
  """Rows, filters through the controls, the counter, the hash, and every image loading."""
  try:
    exe = browser.find_chromium()
  except browser.BrowserError as e:
    pytest.fail(f"the error-page browser test needs Chromium: {e}")
  t0 = time.perf_counter()
  recs, scored = run["recs"], [r for r in run["recs"] if r["pred"] is not None]
  tags, _ = imagecode.load_phenomenon_tags(os.path.join(run["data"], imagecode.ANNOTATION_FILE))
  m = len(scored)
  url = "file://" + run["page"]
  with browser.Browser(exe) as b:
    b.open(url)
    assert b.evaluate(_VISIBLE) == _expected(recs)
    assert b.evaluate(_COUNTER) == f"{m} of {m} descriptions shown"
    _set(b, "f-outcome", "wrong")
    wrong = _expected(recs, "wrong")
    assert 0 < len(wrong) < m and b.evaluate(_VISIBLE) == wrong
    assert b.evaluate(_COUNTER) == f"{len(wrong)} of {m} descriptions shown"
    assert b.evaluate("location.hash") == "#filter=wrong"            # a linkable view
    _set(b, "f-kind", "video")
    assert b.evaluate(_VISIBLE) == _expected(recs, "wrong", "video")
    _set(b, "f-outcome", "all")
    _set(b, "f-kind", "all")
    tag = max({t for r in scored for t in tags.get((r["set"], r["gold"]), ())},
              key=lambda t: len(_expected(recs, tag=t, tags=tags)))
    _set(b, "f-tag", tag)
    assert b.evaluate(_VISIBLE) == _expected(recs, tag=tag, tags=tags) != _expected(recs)
    _set(b, "f-tag", "all")
    words = scored[0]["description"].split()[:4]
    _set(b, "f-q", " ".join(words).upper(), "input")
    want = [f"r{n}" for n, r in enumerate(scored) if " ".join(words) in r["description"].lower()
            or " ".join(words) in r["description"]]
    assert "r0" in b.evaluate(_VISIBLE) and b.evaluate(_VISIBLE) == want

    b.open("about:blank")
    b.open(url + "#filter=correct&kind=static")                      # a link to a view
    want = _expected(recs, "correct", "static")
    assert b.evaluate(_VISIBLE) == want and b.evaluate("document.getElementById('f-kind')"
                                                      ".value") == "static"
    assert b.evaluate(_COUNTER) == f"{len(want)} of {m} descriptions shown"
    b.evaluate("location.hash = 'wrong'")                            # the short form
    b.evaluate("new Promise(r => setTimeout(r, 50))", await_promise=True)
    assert b.evaluate(_VISIBLE) == wrong

    # every thumbnail and overlay the page references loads (lazy loading made eager)
    sizes = b.evaluate("""Promise.all(Array.from(document.images).map(i => {
        i.loading = 'eager';
        return i.complete && i.naturalWidth ? i : new Promise(r => {
          i.onload = i.onerror = () => r(i); });
      })).then(imgs => imgs.map(i => [i.getAttribute('src'), i.naturalWidth]))""",
                       await_promise=True)
    assert len(sizes) == 10 * m + 2, len(sizes)
    assert all(w > 0 for _, w in sizes), [s for s, w in sizes if not w][:3]
    assert sum(s.startswith("overlays/") for s, _ in sizes) == 2
    shot = str(run["root"] / "shot.png")
    assert b.screenshot(shot) > 5000
  elapsed = time.perf_counter() - t0
  print(f"browser checks: {elapsed:.1f} s")


def test_summary_is_the_accuracy_report_and_rows_are_marked(run):
  html = open(run["page"], encoding="utf-8").read()
  scored = [r for r in run["recs"] if r["pred"] is not None]
  tags, _ = imagecode.load_phenomenon_tags(os.path.join(run["data"], imagecode.ANNOTATION_FILE))
  rep = accuracy.accuracy_report(scored, tags)
  for key in ("all", "video", "static"):
    e = rep[key]
    lo, hi = e["ci95"]
    assert (f"<td>{key}</td><td>{100 * e['acc']:.1f}%</td><td>[{100 * lo:.1f}, "
            f"{100 * hi:.1f}]</td><td>{e['correct']}/{e['n']}</td>") in html
  for t, e in rep["tags"].items():
    assert f"<td>{t} ({accuracy.TAG_NAMES[t]})</td><td>{100 * e['acc']:.1f}%</td>" in html
  assert "<td>2 propositions</td>" in html and "propositions 3</span>" in html
  first = re.search(r"<article class='row (\w+)' id='r0'.*?</article>", html).group(0)
  gold = scored[0]["gold"]
  assert f"data-k='{gold}'><img" in first and "mark gold'>GOLD" in first
  assert first.count("mark pred'>PRED") == 1 and first.count("<img") == 11    # + overlay
  assert "loading='lazy'" in first and "data:image" not in html and "http" not in html
  wrong = re.search(r"<article class='row wrong' id='r1'.*?</article>", html).group(0)
  assert "✗ wrong" in wrong and f"class='cand gold' data-k='{scored[1]['gold']}'" in wrong
  assert f"class='cand pred' data-k='{scored[1]['pred']}'" in wrong


def test_skipped_descriptions_are_listed_with_their_reason(run):
  html = open(run["page"], encoding="utf-8").read()
  section = html[html.index("id='skipped'"):]
  assert "Skipped descriptions (1)" in section
  assert "synthvideo-gone" in section and SKIP_REASON in section
  assert "a set whose images vanished" in section
  assert "skipped (listed at the end): <b>1</b>" in html


def test_thumbnails_are_made_once_and_remade_when_the_source_changes(run, tmp_path):
  inp = PageInputs(run["pred"], run["data"], str(tmp_path / "page"), propositions="")
  lines: list[str] = []
  error_page.build_page(inp, log=lines.append)
  n_images = 10 * len(run["split"].sets)
  assert lines[0] == f"thumbnails: 0 reused, {n_images} to make"
  thumbs = sorted(str(p) for p in (tmp_path / "page" / "thumbs").rglob("*.jpg"))
  assert len(thumbs) == n_images
  assert max(Image.open(t).size[0] for t in thumbs) <= 128
  before = {t: os.stat(t).st_mtime_ns for t in thumbs}
  lines.clear()
  error_page.build_page(inp, log=lines.append)
  assert lines[0] == f"thumbnails: {n_images} reused, 0 to make"
  assert {t: os.stat(t).st_mtime_ns for t in thumbs} == before
  s = run["split"].sets[0]
  src = shutil.copy(s.image_paths[3], tmp_path / "keep.jpg")
  try:
    Image.new("RGB", (40, 40), (255, 0, 0)).save(s.image_paths[3])     # a changed source
    lines.clear()
    error_page.build_page(inp, log=lines.append)
  finally:
    shutil.copy(src, s.image_paths[3])
  assert lines[0] == f"thumbnails: {n_images - 1} reused, 1 to make"
  changed = [t for t in thumbs if os.stat(t).st_mtime_ns != before[t]]
  stem = os.path.splitext(os.path.basename(s.image_paths[3]))[0]
  assert changed == [str(tmp_path / "page" / "thumbs" / s.set_name / f"{stem}.jpg")]


def test_bad_input_is_one_error_line_naming_the_file(run, tmp_path, capsys):
  base = ["--data_dir", run["data"], "--out", str(tmp_path / "out"), "--propositions", ""]
  missing = str(tmp_path / "nope.predictions.jsonl")
  assert error_page.main(["--predictions", missing, *base]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and missing in err and err.count("\n") == 1
  bad = tmp_path / "bad.predictions.jsonl"
  bad.write_text(open(run["pred"]).readline() + "{not json\n")
  assert error_page.main(["--predictions", str(bad), *base]) == 2
  assert f"{bad}: line 2: not JSON" in capsys.readouterr().err
  line = json.loads(open(run["pred"]).readline())
  bad.write_text(json.dumps(dict(line, scores=[0.0] * 3)) + "\n")
  assert error_page.main(["--predictions", str(bad), *base]) == 2
  assert f"{bad}: line 1: 'scores' must be 10 numbers" in capsys.readouterr().err
  assert error_page.main(["--predictions", run["pred"], "--data_dir", str(tmp_path / "x"),
                          "--out", str(tmp_path / "out")]) == 2
  assert str(tmp_path / "x") in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out" / "index.html")


def test_a_missing_image_is_named_and_the_previous_page_kept(run, tmp_path, capsys):
  data = str(tmp_path / "data")
  shutil.copytree(run["data"], data)
  out = str(tmp_path / "page")
  args = ["--predictions", run["pred"], "--data_dir", data, "--out", out, "--propositions", ""]
  assert error_page.main(args) == 0
  assert capsys.readouterr().out.rstrip().endswith(f"page: {out}/index.html")
  before = open(os.path.join(out, "index.html"), "rb").read()
  gone = imagecode.list_candidates(os.path.join(data, "image-sets", run["recs"][0]["set"]))[5]
  os.remove(gone)
  assert error_page.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "expected 10 img<k> images, found 9" in err
  assert os.path.dirname(gone) in err
  assert open(os.path.join(out, "index.html"), "rb").read() == before
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_overlay_index_and_bad_overlays(run, tmp_path):
  index = json.load(open(os.path.join(run["inp"].overlays, "index.json")))
  e0 = run["split"].examples[0]
  assert index["overlays"][0] == {"set": e0.set_name, "index": e0.position, "gold": e0.label,
                                  "description": e0.description, "file": "overlay_0000.png"}
  img = Image.open(os.path.join(run["inp"].overlays, "overlay_0000.png"))
  assert img.size == (2 * visualize.OVERLAY_SIDE + 4, visualize.OVERLAY_SIDE)
  with pytest.raises(ErrorPageError, match="overlay index not found"):
    error_page.load_overlays(str(tmp_path))


def test_the_demo_writes_the_page_of_its_last_stage(run, tmp_path):
  from contextblip_jax.run import demo
  ev = tmp_path / "finetune2" / "eval"
  shutil.copytree(os.path.dirname(run["pred"]), ev)
  summary = {"finetune2": {"valid": {"files": {
      "predictions": str(ev / "stage2_valid.predictions.jsonl")}}}}
  page = demo.error_analysis_page(str(tmp_path), run["data"], summary)
  assert page == str(tmp_path / demo.ERROR_PAGE_DIR / "index.html")
  assert demo.ERROR_PAGE_DIR in demo.ENTRIES
  html = open(page, encoding="utf-8").read()
  assert html.count("src='overlays/") == 2 and "Skipped descriptions (1)" in html
  assert demo.error_analysis_page(str(tmp_path), run["data"], {}) is None


def test_a_missing_browser_says_how_to_install_one(monkeypatch, tmp_path):
  monkeypatch.setenv("CONTEXTBLIP_CHROMIUM", str(tmp_path / "no-chromium"))
  with pytest.raises(browser.BrowserError, match="tests/install_browser.sh") as e:
    browser.find_chromium()
  assert "CONTEXTBLIP_CHROMIUM=" in str(e.value)
  monkeypatch.delenv("CONTEXTBLIP_CHROMIUM")
  monkeypatch.setenv("PATH", str(tmp_path))
  with pytest.raises(browser.BrowserError, match="no Chromium found"):
    browser.find_chromium()
