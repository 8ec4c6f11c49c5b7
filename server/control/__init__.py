"""gRPC control plane of a job, served by parameter-server rank 0 beside the training loop.

One module per role, imported downward only (plane -> the others; metrics
and status read the plane's public fields and import none of it):

* `plane`: `ControlPlane`, the lifecycle `dbnps.server.__main__` drives, and
  the operations the RPCs ask for; `make_control_plane` (token file).
* `servicer`: the `dbnps.v1.Control` service on the wire: request decoding,
  argument checks, replies, error codes.
* `auth`: the bearer-token interceptor in front of the mutating calls.
* `startup`: the gRPC server itself: TLS or not, health, reflection, addresses.
* `mainthread`: the queue that hands work to the main thread, the only one
  that may call MPI.
* `status`: the `Status` message made from the live `ServerState`.

Threads and MPI: the gRPC server runs in its own thread pool, but only the
main thread may call MPI.  Handlers therefore never touch the windows:

* `GetStatus` and the Prometheus collector read `ServerState` directly (the
  live object the loop mutates; never a copy).  The workers' stats rows live
  in the window; the server loop refreshes `state.worker_stats` every 0.1 s
  (`ParameterServer.refresh_workers`, also its liveness check).
* `Checkpoint` and `Stop` put a call on the main-thread queue and wait (with
  a timeout) for the main thread to run it from `on_tick`, the hook
  `ParameterServer.run` calls on every loop iteration.  For a checkpoint the
  main thread only takes the snapshot (MPI gathers); the disk work happens
  back on the handler's thread.

Lifecycle (driven by `dbnps.server.__main__`)::

    cp = ControlPlane(...); cp.start()     # health NOT_SERVING, endpoints.json written
    ps = ParameterServer(..., on_tick=cp.on_tick); cp.attach(ps)    # SERVING
    ps.run()
    cp.after_run(ps)     # NOT_SERVING; pending requests served; final checkpoint if stopped
    ps.finish(...)
    cp.close()

Security: bound to 127.0.0.1 unless `bind` says otherwise; `Checkpoint` and
`Stop` need `authorization: Bearer <token>` metadata (UNAUTHENTICATED
otherwise; with no token configured they are refused); optional TLS.
Request bytes are decoded by the handlers themselves so that a malformed
request is INVALID_ARGUMENT, never an exception in the server.
"""
