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
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from absl import flags

TRACEBACK_ENV = 'PSP_JAX_TRACEBACK'
_CONFIG_FLAGS_SOURCE = os.path.join('ml_collections', 'config_flags', 'config_flags.py')


def chain(error: BaseException | None) -> Iterator[BaseException]:
  """error, then what it was raised from or during (__cause__, else __context__), each once."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


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
  except Exception as e:
    culprit = _failing_config_file(e)
    if culprit:  # The config file's own code raised (a SyntaxError, a NameError, ...).
      exit_with(UsageError(_config_file_message(culprit, e)), status=2)
    if isinstance(e, AttributeError | KeyError):  # An override of a key that does not exist.
      exit_with(UsageError(_config_key_message(argv, e)), status=2)
    raise
  _check_config_files(flags.FLAGS)
  none_overrides(argv)
  return rest


def _failing_config_file(error: BaseException) -> str | None:
  """The --config file whose own code raised error while ml_collections loaded it, if any."""
  frames = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(error.__traceback__)]
  loader = [i for i, f in enumerate(frames) if f.endswith(_CONFIG_FLAGS_SOURCE)]
  if not loader:
    return None
  if isinstance(error, SyntaxError) and error.filename:
    return error.filename
  library = f'{os.sep}ml_collections{os.sep}'
  return next((f for f in frames[loader[-1] + 1 :] if library not in f and f[:1] != '<'), None)


def _config_files(flag_values: flags.FlagValues) -> dict[str, str]:
  """{flag name: its config file} of the parsed config-file flags (ml_collections')."""
  from ml_collections import config_flags  # noqa: PLC0415 (only commands with a --config)

  files = {}
  for name in flag_values:
    flag = flag_values[name]
    try:
      if flag.present:
        files[name] = config_flags.get_config_filename(flag)
    except TypeError:  # Not a config flag.
      continue
  return files


def _config_file_message(path: str, error: BaseException) -> str:
  line = getattr(error, 'lineno', None)
  if line is None:
    line = next(
      (
        n
        for frame, n in traceback.walk_tb(error.__traceback__)
        if os.path.realpath(frame.f_code.co_filename) == os.path.realpath(path)
      ),
      None,
    )
  what = f'{type(error).__name__}: {getattr(error, "msg", None) or error}'
  at = f' (line {line})' if line else ''
  return f'--config {path} fails to load: {what}{at}. Fix the file, or pass another config.'


def _check_config_files(flag_values: flags.FlagValues) -> None:
  """One message for a --config file that could not be loaded (ml_collections defers it)."""
  for name, path in _config_files(flag_values).items():
    try:
      getattr(flag_values[name].value, 'keys', None)  # A failed load raises on first access.
    except OSError as e:
      if not os.path.isfile(path):
        message = (
          f'--{name} {path}: no such file. Pass a config file: configs/ holds the recipes '
          '(configs/synthetic.py, configs/ade20k.py, ...).'
        )
      else:
        message = f'--{name} {path} cannot be read ({e.__cause__ or e}).'
      exit_with(UsageError(message), status=2)


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
