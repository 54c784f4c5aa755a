"""One error model: the user's mistakes and bad files, reported by every command in one line.

Errors that describe something the user can fix (a config value, a file, a path, a
checkpoint) derive from `UserError`, whose message names the thing and the fix. Library
callers get the exception; command lines (`report`) print `error: MESSAGE` on stderr and
exit with status 1, or 2 for usage errors. `--verbosity=1` (absl) or PSP_JAX_TRACEBACK=1
shows the traceback as well, for bug reports.
"""

import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from absl import flags

TRACEBACK_ENV = 'PSP_JAX_TRACEBACK'


class UserError(Exception):
  """A mistake of the user or a fault of a file; the message says what and how to fix it."""


class UsageError(UserError):
  """Wrong command-line arguments (exit status 2)."""


class InvalidInputError(UserError, ValueError):
  """A value or file the user gave that cannot be used (a ValueError for library callers)."""


class NotFoundError(UserError, FileNotFoundError):
  """A path the user gave that does not exist (a FileNotFoundError for library callers)."""


class OutputExistsError(UserError, FileExistsError):
  """An output that exists and would be overwritten (a FileExistsError for library callers)."""


class UnreadableFileError(UserError, OSError):
  """A file that exists but cannot be read as what it should be (an OSError for callers)."""


def want_traceback() -> bool:
  """Whether to show tracebacks: PSP_JAX_TRACEBACK=1, or absl's --verbosity of 1 or more."""
  if os.environ.get(TRACEBACK_ENV, '') not in ('', '0'):
    return True
  parsed = flags.FLAGS.is_parsed() and 'verbosity' in flags.FLAGS
  return parsed and flags.FLAGS['verbosity'].value >= 1


def exit_with(error: BaseException, *, status: int = 1) -> NoReturn:
  """Prints `error: MESSAGE` (and the traceback if wanted) on stderr, flushes, exits."""
  if want_traceback():
    traceback.print_exception(error)
  message = str(error) or type(error).__name__
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.stdout.flush()
  raise SystemExit(status)


def _config_key_message(argv: list[str], error: Exception) -> str:
  """'--config.a.b: no config key ...' for the override that failed, with the closest key."""
  text = str(error)  # ml_collections nests a KeyError's repr: match, do not unescape.
  found = re.search(r"'([A-Za-z_]\w*)", text)
  key = found.group(1) if found else '?'
  close = re.search(r'Did you mean "([^"]+)"', text)
  culprit = next((a for a in argv[1:] if a.startswith('--config.') and f'.{key}' in a), None)
  where = culprit.split('=')[0] if culprit else 'a --config.KEY=VALUE override'
  hint = f' Did you mean {close.group(1)!r}?' if close else ''
  return (
    f'{where}: there is no config key {key!r}.{hint} Every key is declared in '
    'psp_jax/config_schema.py.'
  )


def parse_flags(argv: list[str]) -> list[str]:
  """Flag parsing for absl's app.run(main, flags_parser=parse_flags): one message, exit 2.

  ml_collections parses the --config.KEY=VALUE overrides while absl parses flags, before
  main runs; a misspelt key otherwise ends in three chained tracebacks.
  """
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    exit_with(UsageError(f'{e}. Pass --helpfull for every flag.'), status=2)
  except (AttributeError, KeyError) as e:  # An override of a config key that does not exist.
    exit_with(UsageError(_config_key_message(argv, e)), status=2)
  none_overrides(argv)
  return rest


def none_overrides(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Makes --config.KEY=None set a tuple-typed key to None, not to (None,).

  ml_collections parses an override of a tuple key element by element, so `None` becomes
  the one-element tuple (None,), which nothing can use; None (for a range: off) is what
  was meant. Whether None suits the key is then for the config's checks to say
  (psp_jax.train.config_checks, the data pipeline), naming the key.

  Args:
    argv: the command line, as parse_flags got it (already parsed).
    flag_values: the parsed flags holding the config(s).
  """
  args = argv[1:]
  for i, arg in enumerate(args):
    name, sep, value = arg.partition('=')
    if not sep:  # `--config.KEY None`
      value = args[i + 1] if i + 1 < len(args) else ''
    flag, _, key = name.lstrip('-').partition('.')
    if value.strip() != 'None' or not key or not name.startswith('-') or flag not in flag_values:
      continue
    *parents, leaf = key.split('.')
    try:
      section = flag_values[flag].value
      for parent in parents:
        section = section[parent]
      if section[leaf] == (None,):
        section[leaf] = None
    except (AttributeError, KeyError, TypeError):  # Not a config key: not ours to change.
      continue


def report(main: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps a command's main: UserError -> one message and exit 1 (UsageError: 2).

  KeyboardInterrupt (a second Ctrl-C, or one outside training) exits 130 without a
  traceback. Anything else is a bug and keeps its traceback.
  """

  def wrapped(*args: Any, **kwargs: Any) -> Any:
    try:
      return main(*args, **kwargs)
    except UsageError as e:
      exit_with(e, status=2)
    except UserError as e:
      exit_with(e)
    except KeyboardInterrupt as e:
      print(f'Interrupted: {e}.' if str(e) else 'Interrupted.', file=sys.stderr, flush=True)
      raise SystemExit(130) from None

  wrapped.__name__ = getattr(main, '__name__', 'main')
  wrapped.__doc__ = main.__doc__
  return wrapped
