"""`python launch/torchrun_agent.py ARGS` is `torchrun ARGS`, except that a rendezvous that
fails ends with one line saying which rendezvous and what to check, and a worker that fails
(after printing its own error) ends with one line naming it instead of the agent's traceback.

torchrun itself ends a rendezvous that never completes with a bare
`RendezvousTimeoutError` (no message) under a 40-line traceback; on a cluster that reads
like a crash of our code rather than "a node never showed up".
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousTimeoutError,
)
from torch.distributed.run import main, parse_args


def describe(args, exc: RendezvousError) -> str:
    where = (
        f"rendezvous '{args.rdzv_id}' at {args.rdzv_endpoint} "
        f"(backend {args.rdzv_backend}, --nnodes {args.nnodes})"
    )
    if isinstance(exc, RendezvousTimeoutError):
        conf = dict(kv.split("=", 1) for kv in args.rdzv_conf.split(",") if "=" in kv)
        return (
            f"error: {where} timed out: not every node's agent joined within "
            f"{conf.get('join_timeout', 600)} s. Start the launcher on every node with "
            f"the same endpoint and id, and check that each node can reach the endpoint."
        )
    if isinstance(exc, RendezvousConnectionError):
        return (
            f"error: {where}: could not reach the rendezvous store. Is the launcher "
            f"running on the endpoint's host, and can this node reach it?"
        )
    return f"error: {where} failed: {type(exc).__name__}: {exc}"


def describe_worker_failure(exc: ChildFailedError) -> str:
    rank, failure = exc.get_first_failure()
    return (
        f"error: {exc.name} failed: rank {rank} (local rank {failure.local_rank}, pid "
        f"{failure.pid}) exited first, with code {failure.exitcode}; its output above says "
        f"why ({len(exc.failures)} worker(s) of this node failed)"
    )


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except RendezvousError as exc:
        print(describe(parse_args(sys.argv[1:]), exc), file=sys.stderr, flush=True)
        sys.exit(1)
    except ChildFailedError as exc:
        print(describe_worker_failure(exc), file=sys.stderr, flush=True)
        sys.exit(1)
