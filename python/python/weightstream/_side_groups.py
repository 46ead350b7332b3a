"""The gloo side groups of distributed loads (:mod:`weightstream.distributed`), and their end.

Each group load exchanges its ranks' status, and moves the tensors gloo moves, on a gloo group of
its own with the load's short timeout: made once per default group, ranks and timeout, and kept
for later loads of the same ranks. At exit, before the interpreter finalizes, the loads still
alive are closed and the side groups destroyed (see :func:`destroy_all`)."""

import atexit
import datetime
import os
import sys
import weakref

# (ranks, timeout) -> (the default group it was made under, the side group, the pid that made it)
registry = {}
# Side groups that a lost peer left out of step (their collectives no longer match across the
# ranks): never handed out again, destroyed at exit with the others. (group, pid) each.
retired = []
# The group loads not yet over (their iterators): closed first at exit, so that their peers hear
# a farewell before the side group goes.
live = weakref.WeakSet()


def side_group(dist, ranks, timeout):
    """A gloo group of ``ranks`` whose collectives give up after ``timeout`` seconds: the status
    exchanges, and the transfers of tensors gloo moves (the caller's group may be NCCL, which
    waits 10 minutes for a dead peer and forever for a frozen one, or gloo with its 30-minute
    default, which a frozen peer's pending transfer would hold at ``destroy_process_group``).
    Made once per default group, ranks and timeout (every rank agrees on these before it is
    asked for); only its members call."""
    default = dist.distributed_c10d._get_default_group()
    key = (tuple(ranks), float(timeout))
    made = registry.get(key)
    # Made under a default group since destroyed, or by the parent of this forked child (whose
    # threads serve it, not this process's): a new one.
    if made is None or made[0] is not default or made[2] != os.getpid():
        if made is not None:
            retired.append(made[1:])
        side = dist.new_group(
            ranks, backend="gloo", timeout=datetime.timedelta(seconds=timeout), use_local_synchronization=True
        )
        made = registry[key] = (default, side, os.getpid())
    return made[1]


def retire(side):
    """``side`` lost a peer: the next load of these ranks makes a new side group."""
    for key, (_, s, pid) in list(registry.items()):
        if s is side:
            del registry[key]
            retired.append((s, pid))


@atexit.register
def destroy_all():
    """At exit, while the interpreter is whole, destroy the side groups this process made.

    A gloo worker thread can still hold a finished (or failed) transfer for a moment after the
    caller saw it end; if the transfer's tensors have lost their Python objects, dropping it takes
    the GIL. A thread that asks for the GIL once the interpreter finalizes is ended with
    ``pthread_exit``, which aborts the whole process ("terminate called without an active
    exception", SIGABRT, seen after a failed group load exits at once). Destroying the groups
    here, before finalization, joins their worker threads first (torch's process group destructor
    lets go of the GIL while it joins them).

    A load still alive at exit (an iterator in a global, or in a traceback Python keeps for its
    report) is closed first, so that its peers raise ``PeerFailedError`` at once, not
    ``PeerLostError`` after the timeout. After a frozen peer the joins wait for the transfers
    queued before it froze, each at most the load's timeout."""
    mine = os.getpid()
    for it in list(live):
        if it._pid == mine:
            try:
                it.close("its process exits")
            except Exception:  # noqa: BLE001 (exiting: the group's state is its peers' to report)
                pass
    made = [(s, pid) for _, s, pid in registry.values()] + retired
    registry.clear()
    # A forked child's inherited groups are its parent's (their threads are not here to join):
    # left as they are, as they would be without this handler.
    retired[:] = [(s, pid) for s, pid in made if pid != mine]
    groups = [s for s, pid in made if pid == mine]
    made.clear()
    dist = sys.modules.get("torch.distributed")
    for side in groups:
        try:
            if dist.distributed_c10d._world.pg_map.get(side) is not None:
                dist.destroy_process_group(side)
        except Exception:  # noqa: BLE001 (exiting: a group torch already tore down is gone)
            pass
    # The last references to the groups: each is destroyed (its workers joined) here.
    side = None
    groups.clear()
