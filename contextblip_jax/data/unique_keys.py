"""JSON and YAML reading that refuses duplicate keys (both formats silently keep the later
value of a repeated key): `load_json(path, error)`, or `json.load(f,
object_pairs_hook=object_pairs)` then `first_duplicate(data)`; `yaml.load(f,
Loader=yaml_loader())`."""

from __future__ import annotations

import json
from typing import Any

import yaml
import yaml.constructor

from contextblip_jax.storage import paths


class Object(dict):
  """A JSON object remembering the keys it held more than once."""
  duplicates: tuple[str, ...] = ()


def object_pairs(pairs: list[tuple[str, Any]]) -> Object:
  out, dups = Object(), []
  for k, v in pairs:
    if k in out:
      dups.append(k)
    out[k] = v
  out.duplicates = tuple(dups)
  return out


def first_duplicate(obj: Any, where: str = "") -> str | None:
  """'a/b/key' (the path to it) of the first duplicated key in a tree loaded with
  `object_pairs`, or None."""
  if isinstance(obj, Object):
    if obj.duplicates:
      return f"{where}{obj.duplicates[0]}"
    for k, v in obj.items():
      found = first_duplicate(v, f"{where}{k}/")
      if found:
        return found
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      found = first_duplicate(v, f"{where}{i}/")
      if found:
        return found
  return None


def load_json(path: str, error: type[Exception], what: str = "file",
              key_name: str = "key") -> Any:
  """The JSON file at `path` (local or gs://), refusing a repeated key. Every problem is raised
  as `error` naming the file: missing ("<path>: <what> not found"), not JSON, or a duplicate
  `key_name` with the path to it."""
  try:
    with paths.open(path, encoding="utf-8") as f:
      data = json.load(f, object_pairs_hook=object_pairs)
  except FileNotFoundError as e:
    raise error(f"{path}: {what} not found") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise error(f"{path}: not valid JSON ({e})") from e
  dup = first_duplicate(data)
  if dup is not None:
    raise error(f"{path}: duplicate {key_name} {dup!r} (JSON would keep only the later value); "
                f"remove or rename one of them")
  return data


def yaml_loader():
  """PyYAML's (C) safe loader class, refusing a duplicate mapping key (ConstructorError, a
  yaml.YAMLError, with the position)."""
  base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

  class Loader(base):  # pylint: disable=too-many-ancestors
    def construct_mapping(self, node, deep=False):
      seen = set()
      for key_node, _ in node.value:
        key = self.construct_object(key_node, deep=True)
        if key in seen:
          raise yaml.constructor.ConstructorError(
              None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
      return super().construct_mapping(node, deep)
  return Loader
