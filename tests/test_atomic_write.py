"""atomic_directory, atomic_file: a finished block replaces the target; a failed one leaves
it as it was."""

import os

import pytest

from contextblip_jax.storage.atomic import atomic_directory, atomic_file


def _tree(path):
  return sorted(os.listdir(path))


def test_new_directory_appears_only_when_complete(tmp_path):
  out = tmp_path / "out"
  with atomic_directory(str(out)) as tmp:
    (tmp_path / "probe").write_text("x")
    open(os.path.join(tmp, "a.txt"), "w").write("a")
    assert not out.exists()                       # nothing at the target while writing
  assert _tree(out) == ["a.txt"]
  assert oct(out.stat().st_mode & 0o777) == oct(0o755)
  assert _tree(tmp_path) == ["out", "probe"]      # no temporary directories left


def test_existing_directory_is_replaced_whole(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "old.txt").write_text("old")
  with atomic_directory(str(out)) as tmp:
    open(os.path.join(tmp, "new.txt"), "w").write("new")
  assert _tree(out) == ["new.txt"]
  assert _tree(tmp_path) == ["out"]


def test_failure_leaves_existing_directory_and_no_temporaries(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "old.txt").write_text("old")
  with pytest.raises(RuntimeError, match="boom"):
    with atomic_directory(str(out)) as tmp:
      open(os.path.join(tmp, "half.txt"), "w").write("half")
      raise RuntimeError("boom")
  assert _tree(out) == ["old.txt"] and (out / "old.txt").read_text() == "old"
  assert _tree(tmp_path) == ["out"]
  missing = tmp_path / "never"
  with pytest.raises(KeyboardInterrupt):
    with atomic_directory(str(missing)):
      raise KeyboardInterrupt
  assert not missing.exists() and _tree(tmp_path) == ["out"]


def test_file_replaced_only_when_complete(tmp_path):
  path = tmp_path / "sub" / "out.jsonl"
  with atomic_file(str(path)) as f:
    f.write("one\n")
    assert not path.exists()                      # the target appears at the end
  assert path.read_text() == "one\n"
  with pytest.raises(ValueError, match="bad record"):
    with atomic_file(str(path)) as f:
      f.write("partial\n")
      raise ValueError("bad record")
  assert path.read_text() == "one\n"              # untouched by the failed write
  assert _tree(path.parent) == ["out.jsonl"]      # and no .tmp left behind
