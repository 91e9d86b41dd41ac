"""How every command of the project reports a user-facing error: one `error:` line on stderr and
exit status 2, or the full traceback when asked (`--verbose` where the command has it, or
CONTEXTBLIP_VERBOSE set to anything but '' or '0').

  try:
    ...
  except (ValueError, OSError) as e:
    return cli_errors.report(e, verbose=args.verbose)      # prints, returns 2; or re-raises
"""

from __future__ import annotations

import os
import sys

EXIT_USAGE = 2          # bad input, config or data: the message says what to change
ENV = "CONTEXTBLIP_VERBOSE"


def verbose_requested(flag: bool = False) -> bool:
  """`flag` (a command's --verbose) or CONTEXTBLIP_VERBOSE set to a value other than '' / '0'."""
  return bool(flag) or os.environ.get(ENV, "") not in ("", "0")


def report(error: BaseException, verbose: bool = False, hint: str = "",
           status: int = EXIT_USAGE) -> int:
  """Call inside an `except` block: re-raises the exception being handled when verbose output
  was asked for, else prints `error: <error><hint>` to stderr and returns `status`."""
  if verbose_requested(verbose):
    raise                                   # pylint: disable=misplaced-bare-raise
  print(f"error: {error}{hint}", file=sys.stderr, flush=True)
  return status
