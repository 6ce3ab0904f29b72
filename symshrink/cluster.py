"""Scale-out on an existing engine: the grid encodings of a --stream run as tasks on a Dask cluster.

`--cluster local:N` starts a local cluster of N worker processes (one thread each); any other address is a running
Dask scheduler's (`tcp://host:8786`). The driver streams the blocks and ships each chosen site's weight and input
moments to a worker as soon as its block has run; the codes come back and are written in graph order, so the output
is the bytes of the single-process run. Dask distributed is the `cluster` extra, imported only here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from functools import partial

from symshrink.errors import BadInput

__all__ = ["connect"]


@contextlib.contextmanager
def connect(address: str | None) -> Iterator[Callable | None]:
    """`submit(fn, *args) -> future` on the cluster at `address` (None: no cluster, None is yielded)."""
    if address is None:
        yield None
        return
    try:
        from distributed import Client, LocalCluster  # noqa: PLC0415 (the cluster extra)
    except ImportError:
        raise BadInput("--cluster needs Dask distributed: pip install 'symshrink[cluster]'") from None
    cluster = None
    logging.getLogger("distributed").setLevel(logging.ERROR)
    try:
        if address.startswith("local:"):
            workers = address.removeprefix("local:")
            if not workers.isdigit() or not 1 <= int(workers) <= 256:
                raise BadInput(f"--cluster local:N takes a number of workers from 1 to 256, not {workers!r}")
            cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.ERROR)
            client = Client(cluster)
        else:
            client = Client(address, timeout=30)
    except BadInput:
        raise
    except Exception as err:  # noqa: BLE001 (distributed raises OSError, TimeoutError, ValueError for bad addresses)
        if cluster is not None:
            cluster.close()
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadInput(f"cannot reach the Dask scheduler at {address}: {why}") from None
    try:
        yield partial(client.submit, pure=False)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
