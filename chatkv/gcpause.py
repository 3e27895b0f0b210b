"""Python's cyclic garbage collector held off while chatkv starts as a program.

Starting a resumed `chatkv ask` creates a few hundred thousand objects (torch's import
most of them, then the model's modules and tensors), and the collector runs again and
again over all of them: 0.3 s of torch's 1.4 s import and 0.1 s of a 0.4 s model load on
a 2-core machine, for a few cycles to free. So the program turns it off first thing
(`hold`), and once the model has loaded (`release`, from Chat.load) moves everything alive
then into the collector's permanent generation (`gc.freeze`: never scanned again, the
modules and weights a session keeps anyway) and turns it back on. Only the program does
this: chatkv used as a library (tests, scripts) never has its collector touched.
"""

from __future__ import annotations

import gc
import threading
import time

_lock = threading.Lock()
_held = False
paused_s = 0.0  # how long `hold` kept it off, once released (0: never held)
_since = 0.0


def hold() -> None:
    """Turn the collector off until `release`, if it is on."""
    global _held, _since
    with _lock:
        if gc.isenabled():
            gc.disable()
            _held, _since = True, time.perf_counter()


def release() -> None:
    """Freeze what is alive and turn the collector back on, if `hold` turned it off."""
    global _held, paused_s
    with _lock:
        if _held:
            _held = False
            gc.freeze()
            gc.enable()
            paused_s = time.perf_counter() - _since
