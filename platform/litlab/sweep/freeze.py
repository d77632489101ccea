"""Imported LAST by the trial forkserver (`driver._context`, after the modules it preloads).

gc.freeze() moves everything the preload made (torch, Lightning, MLflow, ...) into the permanent
generation, so that:
- a trial forked from the server does not write to those pages when its collector runs: they stay
  shared copy-on-write (the reason gc.freeze exists);
- the server's own exit skips them: its final collection took 4 s on a 2-core machine, with the
  sweep's stdout and stderr still open (`litlab sweep ... | tee log` waited for it).

It also gives Ctrl+C its default handler back (preload_start.py ignored it during the imports): the
forkserver then ignores it itself and restores this default in every trial process.
"""

import gc
import signal

gc.freeze()
signal.signal(signal.SIGINT, signal.default_int_handler)
