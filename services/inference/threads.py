"""Torch's CPU work in as few threads as possible: each thread that runs torch owns an OpenMP team.

torch's CPU kernels run their parallel regions on OpenMP (GNU libgomp), and libgomp
keeps a team of worker threads for every thread that has started a parallel
region, for as long as that thread lives. Between regions a team's workers spin
for a while so the next region starts at once, but only while libgomp manages no
more threads than there are CPUs; with a second team alive (the main thread's, or
an executor thread's that loaded the model), the workers of both sleep between
regions instead, and every one of the few hundred small regions of a decode step
pays for waking them: on a machine with few cores, a decode step then takes
several times as long.

So the inference service loads the model in a thread that ends once it is done
(``in_thread_that_ends``), and the engine runs its start-up checks and every forward
in its own worker thread (services/inference/engine.py): once serving, the
worker's is the only team.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_thread_that_ends(work: Callable[[], T], name: str = "torch-once") -> T:
    """``work()`` in a new thread that ends when it returns (taking its OpenMP team with it);
    its result, or its exception raised here."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]  # type: ignore[return-value]
