"""One way for every command to report an error (storage/cli_errors.py): an `error:` line and
status 2, or the traceback when asked; no command reads CONTEXTBLIP_VERBOSE itself."""

import pathlib

import pytest

from contextblip_jax.storage import cli_errors

REPO = pathlib.Path(__file__).resolve().parent.parent


def _handle(error, **kw):
  try:
    raise error
  except ValueError as e:
    return cli_errors.report(e, **kw)


def test_report_prints_one_line_or_reraises(monkeypatch, capsys):
  monkeypatch.delenv(cli_errors.ENV, raising=False)
  assert _handle(ValueError("bad key 'x'"), hint=" (see --help)") == 2
  assert capsys.readouterr().err == "error: bad key 'x' (see --help)\n"
  assert _handle(ValueError("y"), status=1) == 1
  with pytest.raises(ValueError, match="z"):
    _handle(ValueError("z"), verbose=True)
  for value, reraise in (("1", True), ("yes", True), ("0", False), ("", False)):
    monkeypatch.setenv(cli_errors.ENV, value)
    assert cli_errors.verbose_requested() is reraise


def test_no_command_writes_its_own_error_line_or_reads_the_variable():
  readers = [str(p.relative_to(REPO)) for folder in ("contextblip_jax", "weight_convert")
             for p in sorted((REPO / folder).rglob("*.py"))
             if p.name != "cli_errors.py" and ('"CONTEXTBLIP_VERBOSE"' in p.read_text()
                                               or 'print(f"error:' in p.read_text())]
  assert not readers, readers
