"""Process start-up without the cyclic garbage collector re-scanning what the imports build.

Importing torch, Lightning, MLflow and TerraTorch creates about a million objects that live as long as the process.
While they pile up, CPython (3.11) runs a full collection over all of them each time the long-lived ones grow by a
quarter: 11 or 12 full collections, 3 of the 14 s that ``import terratorch`` takes on the 2-core VM (counted with
:data:`gc.callbacks`). None of it is garbage, and every ``gac`` process, DVC stage and test subprocess pays it again.

:func:`quiet_gc` pauses the collector for a block of imports and then moves what the block built into the permanent
generation (:func:`gc.freeze`), so later full collections do not walk it either. After the block the collector runs
as before, for whatever the stage allocates: a training's reference cycles are still collected. A block that imported
nothing new (``gac.cli.main`` called again in the same process, as tests and notebooks do) freezes nothing: freezing
then would only pin whatever happened to be alive, garbage cycles included, for the rest of the process.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """No cyclic collection inside the block; what it built is frozen at its end if it imported a module. Nests (the
    outermost re-enables)."""
    enabled, modules = gc.isenabled(), len(sys.modules)
    gc.disable()
    try:
        yield
    finally:
        if len(sys.modules) > modules:
            gc.freeze()
        if enabled:
            gc.enable()
