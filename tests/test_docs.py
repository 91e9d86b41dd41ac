"""The repository's documentation stands on its own: no file points at documents a user does not
have, and every relative link (and `docs/<page>.md#anchor` reference) resolves."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Written in pieces so that this file does not match itself.
FORBIDDEN = ("SPEC" + " §", "SPEC" + ".md", "../" + "shared", "/work/" + "shared",
             "ENVIRONMENT" + ".md", "ENVIRONMENT" + " notes")
# Any other mention of that document or its numbered sections ("SPEC'd", "(§4.6)").
FORBIDDEN_RE = re.compile(r"\b" + "SPEC" + r"\b|§ ?\d")
LINKED_DOCS = ("README.md", "bench/README.md", "launch/README.md", "data/imagecode/README.md")
_SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", "build", "dist", ".pytest_cache"}


def _repo_files() -> list[str]:
  """Files a clone holds: git's tracked and not-ignored files, or a walk without git."""
  try:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, check=True).stdout
    files = [f for f in out.decode().split("\0") if f]
  except (OSError, subprocess.CalledProcessError):
    files = []
    for root, dirs, names in os.walk(REPO):
      dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
      files += [os.path.relpath(os.path.join(root, n), REPO) for n in names]
  return sorted(f for f in files if os.path.isfile(os.path.join(REPO, f)))


def _text(rel: str) -> str | None:
  with open(os.path.join(REPO, rel), "rb") as f:
    data = f.read()
  if b"\0" in data[:8192]:
    return None
  return data.decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
  return {f: t for f in _repo_files() if (t := _text(f)) is not None}


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> hyphens."""
  s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return s.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
  found, seen = set(), {}
  in_code = False
  for line in markdown.splitlines():
    if line.startswith("```"):
      in_code = not in_code
    m = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if m:
      base = slug(m.group(1))
      n = seen.get(base, 0)
      seen[base] = n + 1
      found.add(base if n == 0 else f"{base}-{n}")
  return found


def _doc_pages() -> list[str]:
  docs = os.path.join(REPO, "docs")
  return list(LINKED_DOCS) + sorted(f"docs/{n}" for n in os.listdir(docs) if n.endswith(".md"))


def test_no_file_points_outside_the_repository(texts):
  bad = [f"{f}:{i}: {line.strip()[:100]}" for f, t in texts.items() if f != "tests/test_docs.py"
         for i, line in enumerate(t.splitlines(), 1)
         if any(s in line for s in FORBIDDEN) or FORBIDDEN_RE.search(line)]
  assert not bad, "references to documents users do not have:\n" + "\n".join(bad)
  assert len(texts) > 100 and "README.md" in texts


def test_the_docs_pages_exist_and_the_license_and_citation_are_there(texts):
  for f in ("docs/method.md", "docs/decisions.md", "docs/environment.md", "LICENSE",
            "CITATION.cff"):
    assert f in texts, f
  assert "Apache License" in texts["LICENSE"] and "Version 2.0" in texts["LICENSE"]
  cff = texts["CITATION.cff"]
  for title in ("ContextBLIP", "BLIP: Bootstrapping", "Image Retrieval from Contextual"):
    assert title in cff.split("references:", 1)[1], title
  assert "MIT" in texts["data/imagecode/README.md"]


@pytest.mark.parametrize("page", _doc_pages())
def test_relative_links_resolve(page):
  path = os.path.join(REPO, page)
  text = open(path, encoding="utf-8").read()
  text = re.sub(r"```.*?```", "", text, flags=re.S)        # code blocks hold no links
  bad = []
  for target in re.findall(r"\]\(([^)\s]+)\)", text):
    if re.match(r"^[a-z]+:", target):                      # http(s):, mailto:
      continue
    file_part, _, anchor = target.partition("#")
    dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
    if not os.path.exists(dest):
      bad.append(f"{target}: no such file")
    elif anchor and dest.endswith(".md") and anchor not in anchors(open(dest).read()):
      bad.append(f"{target}: no heading with anchor #{anchor}")
  assert not bad, f"{page}:\n" + "\n".join(bad)


def test_docs_references_in_code_and_text_resolve(texts):
  """`docs/<page>.md#<anchor>` references and `docs/decisions.md ... item N` in any file."""
  pages = {}
  bad = []
  items = len(re.findall(r"^## Item \d+:", texts["docs/decisions.md"], flags=re.M))
  assert items >= 22
  for f, t in texts.items():
    for page, anchor in re.findall(r"docs/(\w+)\.md#([\w-]+)", t):
      rel = f"docs/{page}.md"
      if rel not in texts:
        bad.append(f"{f}: {rel} does not exist")
        continue
      pages.setdefault(rel, anchors(texts[rel]))
      if anchor not in pages[rel]:
        bad.append(f"{f}: {rel}#{anchor} is not a heading")
    for n in re.findall(r"docs/decisions\.md,? items? (\d+)", t):
      if not 1 <= int(n) <= items:
        bad.append(f"{f}: docs/decisions.md item {n} does not exist")
  assert not bad, "\n".join(bad)


def test_slug_follows_github():
  assert slug("Fine-tuning stage 1") == "fine-tuning-stage-1"
  assert slug("TMIM decoder and loss") == "tmim-decoder-and-loss"
  assert slug("Item 7: TMIM visible-patch pixel layout") == "item-7-tmim-visible-patch-pixel-layout"
  assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}
