"""Reading an orbax checkpoint whole: every array read first, and the noise of abandoned reads.

check_readable reads and decodes each array with tensorstore before orbax reads any of it,
so a damaged checkpoint fails with no read unfinished; quiet_abandoned_reads drops what
tensorstore's threads print when a read is abandoned anyway (a failed save or restore).
"""

import logging
import os
import re
import sys
from typing import Any

from psp_jax import errors, paths

_ASYNCIO_LOOP = os.path.join('asyncio', 'base_events.py')
_UNRETRIEVED = re.compile(r'\w+ exception was never retrieved')
# tensorstore's error names its spec; orbax's wrapper of it points at 'full TensorStore details'.
_TENSORSTORE_MARKS = ('[tensorstore_spec=', 'See full TensorStore details')


def quiet_abandoned_reads() -> None:
  """Keeps the reads orbax abandons after a failed one from printing tracebacks.

  A restore that fails returns at its first bad array and closes its event loop while
  tensorstore threads finish the other reads: each then calls back into the closed loop,
  its coroutine is closed mid-read and its task's error is never retrieved, and Python and
  asyncio print all three (a page of tensorstore spec each) after the one-line warning. This
  drops exactly those, from the first failed read on; anything else is printed as before.
  check_readable keeps a damaged checkpoint from getting that far: what is left is a save
  that fails (a full disk: its writes are abandoned alike), or a file changed in between.
  """
  previous = sys.unraisablehook
  if not getattr(previous, 'drops_abandoned_reads', False):

    def hook(unraisable: Any) -> None:
      if not _abandoned_read(unraisable):
        previous(unraisable)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook
  # Some callbacks report it through PyErr_Print, i.e. sys.excepthook, instead (seen in
  # psp_jax.evaluate on Python 3.12): the same error, dropped the same way.
  previous_excepthook = sys.excepthook
  if not getattr(previous_excepthook, 'drops_abandoned_reads', False):

    def excepthook(kind: type, error: BaseException, tb: Any) -> None:
      if not _loop_closed_in_asyncio(error, tb):
        previous_excepthook(kind, error, tb)

    excepthook.drops_abandoned_reads = True
    sys.excepthook = excepthook
  asyncio_log = logging.getLogger('asyncio')
  if _abandoned_task not in asyncio_log.filters:
    asyncio_log.addFilter(_abandoned_task)


def _abandoned_task(record: logging.LogRecord) -> bool:
  """False (drop it) for asyncio's report of a tensorstore read error nobody awaited.

  A Task's or a gather's (asyncio names the class: 'Task exception was never retrieved',
  '_GatheringFuture exception ...'); the error is tensorstore's, or orbax's wrapper of it.
  """
  error = record.exc_info[1] if record.exc_info else None
  unretrieved = _UNRETRIEVED.match(str(record.msg)) is not None
  return not (unretrieved and _from_tensorstore(error))


def _from_tensorstore(error: BaseException | None) -> bool:
  """Whether error, or one it was raised from or during, is a tensorstore read's."""
  return any(mark in str(e) for e in errors.chain(error) for mark in _TENSORSTORE_MARKS)


def _loop_closed_in_asyncio(error: BaseException, tb: Any) -> bool:
  """A closed event loop's error raised in asyncio itself, called from no Python frame (a
  tensorstore callback thread's)."""
  if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
    return False
  return tb is not None and tb.tb_frame.f_code.co_filename.endswith(_ASYNCIO_LOOP)


def _abandoned_read(unraisable: Any) -> bool:
  """Whether an unraisable exception is an abandoned orbax read's (quiet_abandoned_reads)."""
  error, tb = unraisable.exc_value, unraisable.exc_traceback
  if _loop_closed_in_asyncio(error, tb):
    return True
  code = getattr(unraisable.object, 'cr_code', None)  # A coroutine, closed...
  in_orbax = code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename
  return in_orbax and isinstance(getattr(error, '__context__', None), GeneratorExit)  # ...early.


def check_readable(tree_dir: str | os.PathLike) -> None:
  """Reads and decodes every array of an orbax tree directory, one read finished at a time.

  Orbax's restore reads all arrays at once and, at the first that fails, closes its event
  loop on the others: tensorstore's threads then report into the closed loop (the noise
  quiet_abandoned_reads drops). Read here first, a damaged checkpoint fails before orbax
  reads anything, with nothing left unfinished. A tree in another layout than OCDBT (no
  manifest.ocdbt) is left to orbax.

  Raises:
    The first read's error (tensorstore's ValueError names the array and the file).
  """
  import tensorstore as ts  # noqa: PLC0415 (orbax's own dependency)

  tree_dir = paths.as_path(tree_dir)
  if not (tree_dir / 'manifest.ocdbt').exists():
    return
  base = str(tree_dir) if paths.is_remote(tree_dir) else f'file://{tree_dir}'
  kvstore = {'driver': 'ocdbt', 'base': base + '/'}
  keys = ts.KvStore.open(kvstore).result().list().result()
  for name in sorted({k.decode().split('/')[0] for k in keys if b'/' in k}):
    spec = {'driver': 'zarr', 'kvstore': dict(kvstore, path=name + '/')}
    ts.open(spec, open=True).result().read().result()
