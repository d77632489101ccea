"""Imported FIRST by the trial forkserver (`driver._context`, before the modules it preloads).

The forkserver is in the terminal's process group, and it shields itself from Ctrl+C only once its
imports are done (multiprocessing.forkserver.main): a Ctrl+C in those seconds printed a
KeyboardInterrupt traceback from deep inside torch, beside the sweep's own line. It ignores SIGINT
while it imports; freeze.py, imported last, gives the default back, which is what the forkserver
then restores in each trial process it forks.
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
