"""Number of propositions of each IMAGECODE valid description (paper Table 10).

`valid_split.json` (the ContextBLIP authors' `dataset/valid_split.json`, shipped in the
repository's data/imagecode/) maps each of the 2,302 valid descriptions, keyed by the text
exactly as in valid_data.json, to its list of NDCR sub-propositions; the histogram of list
lengths {1: 72, 2: 899, 3: 1215, 4: 99, 5: 14, 6: 3} is the "All" row of Table 10.

Which file an evaluation uses (`config.data.propositions_file`, `resolve_file`):
  'auto' (default of configs/evaluate.py)  <imagecode_dir>/valid_split.json when it exists,
        else the repository's data/imagecode/valid_split.json when it exists (a checkout or an
        editable install), else none; descriptions that are not in the file are counted
        (`missing` in the report), and a file that matches none of them gives no table (the
        synthetic demo's descriptions are not in it) without an error;
  ''    off;
  PATH  that file: it must exist and match at least one description of the split (else an
        error naming the file), the unmatched ones counted as above.
Only the valid split is analysed (the file covers the valid descriptions).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Iterable, Mapping

from contextblip_jax.data import unique_keys

FILE_NAME = "valid_split.json"
# The repository's copy: <checkout>/data/imagecode/valid_split.json.
SHIPPED_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "data", "imagecode", FILE_NAME)


class PropositionsError(ValueError):
  """A malformed or unusable propositions file; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class Propositions:
  """{description: number of propositions} read from `source`; `explicit`: the file was
  named in the config (so matching no description is an error)."""
  source: str
  counts: Mapping[str, int]
  explicit: bool = False

  def histogram(self) -> dict[int, int]:
    return histogram(self.counts)


def load_propositions(path: str) -> dict[str, int]:
  """{description: len(sub-propositions)} of a valid_split.json; raises PropositionsError."""
  data = unique_keys.load_json(path, PropositionsError, "propositions file", "description")
  if not isinstance(data, dict) or not data:
    raise PropositionsError(f"{path}: expected a non-empty object {{description: "
                            "[sub-proposition, ...]}}")
  out = {}
  for text, props in data.items():
    if (not isinstance(props, list) or not props
        or not all(isinstance(p, str) for p in props)):
      raise PropositionsError(f"{path}: description {text[:60]!r}: expected a non-empty list "
                              f"of strings, got {props!r:.80}")
    out[text] = len(props)
  return out


def histogram(counts: Mapping[str, int] | Iterable[int]) -> dict[int, int]:
  """{number of propositions: descriptions}, sorted by the number."""
  values = counts.values() if isinstance(counts, Mapping) else counts
  return dict(sorted(collections.Counter(values).items()))


def resolve_file(setting: str, imagecode_dir: str = "") -> tuple[str | None, bool]:
  """(the file to use or None, explicit) for a `config.data.propositions_file` value."""
  setting = (setting or "").strip()
  if not setting:
    return None, False
  if setting != "auto":
    if not os.path.isfile(setting):
      raise PropositionsError(f"config.data.propositions_file: {setting} not found")
    return setting, True
  for candidate in ([os.path.join(imagecode_dir, FILE_NAME)] if imagecode_dir else []) + [
      SHIPPED_FILE]:
    if os.path.isfile(candidate):
      return candidate, False
  return None, False


def load(setting: str, imagecode_dir: str = "") -> Propositions | None:
  """The Propositions of a `propositions_file` setting ('auto', '' or a path; `resolve_file`),
  or None when it names no file."""
  path, explicit = resolve_file(setting, imagecode_dir)
  return None if path is None else Propositions(path, load_propositions(path), explicit)


def for_split(cfg: Any, split_name: str, descriptions: Iterable[str]) -> Propositions | None:
  """The propositions of an evaluation of `split_name` from `cfg.data.propositions_file`
  (absent = 'auto'), or None (not the valid split, off, or 'auto' with no file). An explicit
  file that matches none of `descriptions` raises PropositionsError before any scoring."""
  if split_name != "valid":
    return None
  props = load(cfg.data.get("propositions_file", "auto"), cfg.data.get("imagecode_dir", ""))
  if props is not None and props.explicit and not any(d in props.counts for d in descriptions):
    raise PropositionsError(f"{props.source}: none of the split's descriptions is a key of "
                            "this file (keys must be the descriptions exactly as in "
                            "valid_data.json); use config.data.propositions_file='' to leave "
                            "the analysis out")
  return props
