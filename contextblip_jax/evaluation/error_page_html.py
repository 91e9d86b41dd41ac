"""The HTML of the error-analysis page (`evaluation/error_page.py` collects what it shows).

One self-contained document: inline CSS and JavaScript, no network resource; images are the
page-relative thumbnails and overlays, loaded lazily. Every row carries its filter keys as
data attributes (data-outcome, data-kind, data-tags, data-search), so the filters are a few
lines of plain JavaScript; the rows are in the HTML itself, readable without JavaScript.

Marks: the gold candidate has a solid green frame and the text "GOLD", the prediction a dashed
blue frame and "PRED" (both on a correct row's one image), so neither relies on colour.
"""

from __future__ import annotations

import html
import json
import urllib.parse
from typing import Any, Mapping, Sequence

from contextblip_jax.evaluation import accuracy

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header.top{background:#fff;border-bottom:1px solid #d0d7de;padding:12px 20px}
h1{font-size:20px;margin:0 0 6px} h2{font-size:16px;margin:12px 0 6px}
main{padding:0 20px 40px}
table.acc{border-collapse:collapse;background:#fff;font-size:12px}
table.acc td,table.acc th{border:1px solid #d0d7de;padding:1px 8px;text-align:right}
table.acc th:first-child,table.acc td:first-child{text-align:left}
.sums{display:flex;gap:20px;flex-wrap:wrap;align-items:flex-start}
.sources{font-size:12px;color:#57606a} .sources code{word-break:break-all}
.counts{max-width:560px} .counts ul{margin:0 0 6px;padding-left:0;list-style:none}
#counts li{display:inline-block;margin-right:14px}
.controls{position:sticky;top:0;z-index:2;background:#f6f8fa;padding:10px 0;
  border-bottom:1px solid #d0d7de;display:flex;gap:14px;flex-wrap:wrap;align-items:center}
.controls label{font-weight:600} #counter{font-weight:700}
.row{background:#fff;border:1px solid #d0d7de;border-left:6px solid #8c959f;
  border-radius:6px;margin:10px 0;padding:8px 12px}
.row.correct{border-left-color:#1a7f37} .row.wrong{border-left-color:#cf222e}
.row[hidden]{display:none}
.meta{font-size:12px;color:#57606a;display:flex;gap:10px;flex-wrap:wrap;align-items:center}
.badge{font-weight:700;padding:1px 6px;border-radius:10px;color:#fff;background:#8c959f}
.badge.correct{background:#1a7f37} .badge.wrong{background:#cf222e}
.tag{background:#ddf4ff;border-radius:8px;padding:0 6px}
.desc{font-size:15px;margin:4px 0 8px}
.body{display:flex;gap:16px;align-items:flex-start;flex-wrap:wrap}
.cands{display:flex;gap:6px;flex-wrap:wrap}
.cand{margin:0;width:104px;font-size:11px;text-align:center}
.cand img{width:96px;height:96px;object-fit:contain;background:#eaeef2;
  border:4px solid transparent;display:block;margin:0 auto}
.cand.gold img{border-color:#1a7f37}
.cand.pred img{outline:4px dashed #0969da;outline-offset:-4px}
.cand.gold.pred img{outline-color:#0969da}
.mark{display:inline-block;font-weight:700;padding:0 3px;border-radius:3px;margin:1px}
.mark.gold{color:#fff;background:#1a7f37} .mark.pred{color:#fff;background:#0969da}
.bar{height:6px;background:#eaeef2;border-radius:3px;margin:3px 4px 0}
.bar span{display:block;height:100%;background:#6e7781;border-radius:3px}
.cand.pred .bar span{background:#0969da}
.overlay{margin:0;font-size:11px;color:#57606a;max-width:260px}
.overlay img{max-width:260px;image-rendering:pixelated;display:block}
table.skipped{border-collapse:collapse;background:#fff;font-size:13px}
table.skipped td,table.skipped th{border:1px solid #d0d7de;padding:3px 8px;text-align:left}
"""

_JS = """
(function(){
  var rows=Array.prototype.slice.call(document.querySelectorAll('#rows .row'));
  var c={outcome:document.getElementById('f-outcome'),kind:document.getElementById('f-kind'),
         tag:document.getElementById('f-tag'),q:document.getElementById('f-q')};
  var counter=document.getElementById('counter');
  function has(sel,v){return Array.prototype.some.call(sel.options,function(o){return o.value===v;});}
  function apply(){
    var o=c.outcome.value,k=c.kind.value,t=c.tag.value,q=c.q.value.trim().toLowerCase(),n=0;
    rows.forEach(function(r){
      var show=(o==='all'||r.dataset.outcome===o)&&(k==='all'||r.dataset.kind===k)&&
        (t==='all'||(' '+r.dataset.tags+' ').indexOf(' '+t+' ')>=0)&&
        (!q||r.dataset.search.indexOf(q)>=0);
      r.hidden=!show; if(show)n++;
    });
    counter.textContent=n+' of '+rows.length+' descriptions shown';
    counter.setAttribute('data-shown',n);
  }
  function toHash(){
    var p=[];
    if(c.outcome.value!=='all')p.push('filter='+c.outcome.value);
    if(c.kind.value!=='all')p.push('kind='+c.kind.value);
    if(c.tag.value!=='all')p.push('tag='+encodeURIComponent(c.tag.value));
    if(c.q.value.trim())p.push('q='+encodeURIComponent(c.q.value.trim()));
    var h=p.join('&');
    try{history.replaceState(null,'',h?'#'+h:location.pathname+location.search);}
    catch(e){location.hash=h;}
  }
  function fromHash(){
    var h=location.hash.replace(/^#/,''),v={outcome:'all',kind:'all',tag:'all',q:''};
    h.split('&').forEach(function(part){
      if(!part)return;
      var i=part.indexOf('='),key=i<0?'':part.slice(0,i),val=decodeURIComponent(i<0?part:part.slice(i+1));
      if(key==='filter'||key==='outcome')v.outcome=val;
      else if(key==='kind')v.kind=val; else if(key==='tag')v.tag=val; else if(key==='q')v.q=val;
      else if(has(c.outcome,val))v.outcome=val; else if(has(c.kind,val))v.kind=val;
      else if(has(c.tag,val))v.tag=val;
    });
    ['outcome','kind','tag'].forEach(function(f){c[f].value=has(c[f],v[f])?v[f]:'all';});
    c.q.value=v.q;
  }
  ['outcome','kind','tag'].forEach(function(f){
    c[f].addEventListener('change',function(){apply();toHash();});});
  c.q.addEventListener('input',function(){apply();toHash();});
  window.addEventListener('hashchange',function(){fromHash();apply();});
  fromHash();apply();
})();
"""


def _e(x: Any) -> str:
  return html.escape(str(x), quote=True)


def _src(rel: str) -> str:
  return _e(urllib.parse.quote(rel))


def _acc_row(label: str, e: Mapping[str, Any] | None) -> str:
  if not e or not e.get("n"):
    return f"<tr><td>{_e(label)}</td><td>–</td><td>–</td><td>0</td></tr>"
  lo, hi = e["ci95"]
  return (f"<tr><td>{_e(label)}</td><td>{100 * e['acc']:.1f}%</td>"
          f"<td>[{100 * lo:.1f}, {100 * hi:.1f}]</td><td>{e['correct']}/{e['n']}</td></tr>")


def _table(tid: str, first: str, rows: Sequence[str]) -> str:
  head = (f"<tr><th>{_e(first)}</th><th>accuracy</th><th>95% CI</th><th>correct/n</th></tr>")
  return f"<table class='acc' id='{tid}'>{head}{''.join(rows)}</table>"


def _acc_tables(report: Mapping[str, Any]) -> str:
  """All / video / static (+ by number of propositions), and per tag, side by side."""
  main = [_acc_row(k, report.get(k)) for k in ("all", "video", "static")]
  props = report.get("propositions")
  if props and props["matched"]:
    main += [_acc_row(f"{k} proposition{'s' if k != '1' else ''}", e)
             for k, e in props["by_count"].items()]
  out = ["<div>" + _table("summary", "descriptions", main) + "<div class='sources'>chance: 1 "
         "in 10; Wilson 95% intervals (<code>evaluation/accuracy.py</code>)</div></div>"]
  tags = [_acc_row(f"{t} ({accuracy.TAG_NAMES.get(t, t)})", e)
          for t, e in report.get("tags", {}).items()]
  if tags:
    out.append(_table("tag-summary", "tag", tags))
  return "".join(out)


def _counts(summary: Mapping[str, Any]) -> str:
  rep = summary["report"]
  items = [("scored descriptions", summary["scored"]),
           ("skipped (listed at the end)", summary["skipped"]),
           ("unlabelled", rep.get("unlabelled", 0))]
  if "tagged" in rep:
    items.append(("tagged", rep["tagged"]))
  props = rep.get("propositions")
  if props:
    items.append(("in the propositions file", f"{props['matched']} "
                  f"(not in it: {props['missing']})"))
  items += [("thumbnails", summary["thumbnails"]), ("overlays shown", summary["overlays"])]
  lis = "".join(f"<li>{_e(k)}: <b>{_e(v)}</b></li>" for k, v in items)
  srcs = "".join(f"<li>{_e(k)}: <code>{_e(v)}</code></li>"
                 for k, v in summary["sources"].items())
  return (f"<div class='counts'><ul id='counts'>{lis}</ul><ul class='sources'>{srcs}</ul>"
          "</div>")


def _controls(rows: Sequence[Mapping[str, Any]]) -> str:
  outcomes = ["correct", "wrong"] + (["unlabelled"] if any(
      r["outcome"] == "unlabelled" for r in rows) else [])
  tag_n: dict[str, int] = {}
  for r in rows:
    for t in r["tags"]:
      tag_n[t] = tag_n.get(t, 0) + 1
  def opts(values):
    return "<option value='all'>all</option>" + "".join(
        f"<option value='{_e(v)}'>{_e(label)}</option>" for v, label in values)
  tags = [(t, f"{t} – {accuracy.TAG_NAMES.get(t, t)} ({n})") for t, n in sorted(tag_n.items())]
  return ("<div class='controls'>"
          f"<label>outcome <select id='f-outcome'>{opts((o, o) for o in outcomes)}</select>"
          "</label>"
          f"<label>kind <select id='f-kind'>{opts((k, k) for k in ('video', 'static'))}"
          "</select></label>"
          f"<label>tag <select id='f-tag'>{opts(tags)}</select></label>"
          "<label>text <input id='f-q' type='search' placeholder='words of the description'>"
          f"</label><span id='counter' data-shown='{len(rows)}'>{len(rows)} of {len(rows)} "
          "descriptions shown</span></div>")


def _candidate(r: Mapping[str, Any], k: int) -> str:
  gold, pred = k == r["gold"], k == r["pred"]
  cls = "cand" + (" gold" if gold else "") + (" pred" if pred else "")
  marks = ("<span class='mark gold'>GOLD</span>" if gold else "") + (
      "<span class='mark pred'>PRED</span>" if pred else "")
  score = r["scores"][k]
  return (f"<figure class='{cls}' data-k='{k}'><img src='{_src(r['thumbs'][k])}' "
          f"loading='lazy' width='96' height='96' alt='candidate {k}'>"
          f"<figcaption>{k} {marks}<div class='bar' title='score {score:.4g}'>"
          f"<span style='width:{r['widths'][k]}%'></span></div>{score:.3g}</figcaption>"
          "</figure>")


def row(r: Mapping[str, Any]) -> str:
  """One description's block."""
  badge = {"correct": "✓ correct", "wrong": "✗ wrong", "unlabelled": "unlabelled"}[r["outcome"]]
  meta = [f"<span class='badge {r['outcome']}'>{badge}</span>", f"<span>{r['kind']}</span>",
          f"<span>set <code>{_e(r['set'])}</code> description {r['index']}</span>",
          f"<span>gold {'–' if r['gold'] is None else r['gold']}, predicted {r['pred']}</span>"]
  if r["tags"]:
    meta.append("<span>tags " + " ".join(
        f"<span class='tag' title='{_e(accuracy.TAG_NAMES.get(t, t))}'>{_e(t)}</span>"
        for t in r["tags"]) + "</span>")
  if r["propositions"] is not None:
    meta.append(f"<span>propositions {r['propositions']}</span>")
  cands = "".join(_candidate(r, k) for k in range(len(r["thumbs"])))
  overlay = ""
  if r["overlay"]:
    overlay = (f"<figure class='overlay'><img src='{_src(r['overlay'])}' loading='lazy' "
               "alt='attention and text-guided mask'><figcaption>gold image: cross-attention "
               "| text-guided mask</figcaption></figure>")
  search = f"{r['description']} {r['set']}".lower()
  return (f"<article class='row {r['outcome']}' id='r{r['n']}' data-outcome='{r['outcome']}' "
          f"data-kind='{r['kind']}' data-tags='{_e(' '.join(r['tags']))}' "
          f"data-search='{_e(search)}'><div class='meta'>{''.join(meta)}</div>"
          f"<p class='desc'>{_e(r['description'])}</p>"
          f"<div class='body'><div class='cands'>{cands}</div>{overlay}</div></article>")


def _skipped(skipped: Sequence[Mapping[str, Any]]) -> str:
  if not skipped:
    return "<h2 id='skipped'>Skipped descriptions (0)</h2><p>None.</p>"
  body = "".join(
      f"<tr><td><code>{_e(s.get('set'))}</code></td><td>{_e(s.get('index'))}</td>"
      f"<td>{_e(s.get('description'))}</td><td>{_e(s.get('skipped') or 'no reason given')}"
      "</td></tr>" for s in skipped)
  return (f"<h2 id='skipped'>Skipped descriptions ({len(skipped)})</h2>"
          "<p>Left out of the evaluation by the reader (not scored, not in the accuracies)."
          "</p><table class='skipped'><tr><th>set</th><th>description #</th><th>text</th>"
          f"<th>reason</th></tr>{body}</table>")


def page(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
         skipped: Sequence[Mapping[str, Any]]) -> str:
  """The whole document."""
  title = f"Error analysis: {summary['predictions']}"
  data = json.dumps({"scored": summary["scored"], "skipped": summary["skipped"]})
  return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
          "<meta name='viewport' content='width=device-width, initial-scale=1'>"
          f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
          f"<header class='top'><h1>Error analysis</h1><div class='sources'>"
          f"<code>{_e(summary['predictions'])}</code></div></header><main>"
          f"<h2>Accuracy</h2><div class='sums'>{_acc_tables(summary['report'])}"
          f"{_counts(summary)}</div>"
          f"<h2>Descriptions</h2>{_controls(rows)}"
          "<p class='sources'>Frames: <span class='mark gold'>GOLD</span> solid green = the "
          "described image; <span class='mark pred'>PRED</span> dashed blue = the model's "
          "pick. Bars: each score between the set's lowest (short) and highest (full).</p>"
          f"<div id='rows'>{''.join(row(r) for r in rows)}</div>{_skipped(skipped)}"
          f"<script type='application/json' id='page-data'>{data}</script>"
          f"<script>{_JS}</script></main></body></html>\n")
