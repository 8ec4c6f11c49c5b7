"""`python -m dbnps.server`: one parameter-server rank of an MPMD job (launched by psctl)."""

from __future__ import annotations

from dbnps.common import boot  # first, before mpi4py: bounds MPI_Init and set-up

# isort: split
import faulthandler
import os
import signal
import sys
from pathlib import Path

import click
from mpi4py import MPI

from dbnps.common import rma
from dbnps.common.config import load
from dbnps.common.errors import UserError, exit_on_user_error
from dbnps.common.job import (
    check_ranks,
    check_shards,
    initial_params,
    layout_of,
    load_data,
    settle_setup,
)
from dbnps.runfiles import EXIT_DIVERGED


@click.command()
@click.option("--config", "config_path", type=click.Path(), default=None)
@click.option("--data-dir", default=None)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="model file (.npz)")
@click.option("--summary", type=click.Path(path_type=Path), default=None, help="summary JSON")
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="control plane: endpoints.json, token, checkpoints/ go here",
)
@click.option("--job-id", default=None, help="job id reported by status (default: run dir name)")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=None, help="0: any free port")
@click.option(
    "--metrics-port", type=click.IntRange(0, 65535), default=None, help="0: any free port"
)
@click.option("--bind", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--token-file", type=click.Path(path_type=Path), default=None)
@click.option("--tls-cert", type=click.Path(path_type=Path), default=None)
@click.option("--tls-key", type=click.Path(path_type=Path), default=None)
@click.option("--keep-checkpoints", type=click.IntRange(1), default=3, show_default=True)
@click.option(
    "--resume",
    type=click.Path(path_type=Path),
    default=None,
    help="continue from this checkpoint file, or the newest good one of a run/checkpoints dir",
)
@click.option("--restarts", type=click.IntRange(0), default=0, hidden=True)  # set by supervise
@click.option("--progress", is_flag=True, hidden=True)  # set by `psctl run` on a terminal
@exit_on_user_error
def main(config_path, data_dir, out, summary, resume, restarts, progress, **control_opts) -> None:
    from dbnps.server.checkpoint.periodic import Periodic
    from dbnps.server.checkpoint.store import CheckpointStore
    from dbnps.server.server import ParameterServer

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: stacks to stderr
    cfg = load(config_path)
    topo = rma.Topology.discover("server")
    check_ranks(cfg, topo.n_workers, topo.n_servers)  # same verdict on every rank: no hang
    job = Setup()
    try:
        error = None
        try:
            job.prepare(cfg, topo, data_dir, out, resume, restarts, control_opts)
        except UserError as exc:
            error = exc
        settle_setup(topo.comm, error)  # every rank leaves together if any set-up failed
        layout, data = job.layout, job.data
        on_tick = job.control.on_tick if job.control is not None else None
        ps = ParameterServer(
            cfg,
            topo,
            layout,
            job.init,
            len(data.y_train),
            evaluate=job.evaluate,
            evaluate_test=job.evaluate_test,
            eval_split=job.split,
            on_tick=on_tick,
            resume=job.resumed,
        )
        boot.done()  # windows made, parameters published: start-up is over
        if progress:
            ps.progress_every_s = 0.5
        control = job.control
        periodic = None
        if topo.rank == 0 and (
            cfg.run.checkpoint_every_s > 0 or cfg.run.checkpoint_every_updates > 0
        ):
            if control is not None:
                store = control.store
            else:
                folder = (out.parent if out is not None else Path.cwd()) / "checkpoints"
                store = CheckpointStore(folder, keep=control_opts["keep_checkpoints"])
            periodic = Periodic(
                store,
                every_s=cfg.run.checkpoint_every_s,
                every_updates=cfg.run.checkpoint_every_updates,
                job_id=control.job_id if control is not None else "",
            )
            periodic.start(ps.state.version)
            ps.checkpointer = periodic
        if control is not None:
            control.attach(ps)
        ps.run()
        if periodic is not None:
            periodic.close()
        if control is not None:
            control.after_run(ps)  # final checkpoint when stopped over gRPC
        ps.finish(out, summary)
        if ps.state.diverged:
            sys.exit(EXIT_DIVERGED)  # distinct from a crash: supervise does not retry it
    except MPI.Exception as exc:  # a peer died inside a collective (set-up or exit)
        print(f"error: server rank {topo.rank}: MPI error: {exc}", file=sys.stderr, flush=True)
        if job.control is not None:
            job.control.close()
        os._exit(3)  # not through the collective MPI_Finalize the dead peer would block
    finally:
        if job.control is not None:
            job.control.close()


class Setup:
    """What a server rank loads before any window exists; errors are UserErrors."""

    control = resumed = data = layout = init = evaluate = evaluate_test = None
    split = "test"

    def prepare(self, cfg, topo, data_dir, out, resume, restarts, control_opts) -> None:
        from dbnps.server.checkpoint.store import find_resumable

        path = None
        if resume is not None:  # every server rank reads the file; rank 0 reports
            warn = (lambda m: print(m, file=sys.stderr, flush=True)) if topo.rank == 0 else None
            path, self.resumed = find_resumable(resume, warn=warn or (lambda m: None))
            if self.resumed[0].shape != (layout_of(cfg).size,):
                raise UserError(
                    f"cannot resume from {path}: it holds {self.resumed[0].size} parameters, "
                    f"the config's network has {layout_of(cfg).size}"
                )
            if topo.rank == 0:
                m = self.resumed[2]
                print(
                    f"[server] resuming from {path}: phase {m['phase_name']}, "
                    f"version {m['version']}, {m['samples_in_phase']} samples into the phase",
                    flush=True,
                )
        if topo.rank == 0 and (control_opts["run_dir"] or control_opts["grpc_port"] is not None):
            from dbnps.server.control.plane import make_control_plane

            self.control = make_control_plane(cfg, out=out, **control_opts)
            self.control.restarts = restarts
            # status while starting reports the job's shape, not zeros
            self.control.n_servers, self.control.n_workers = topo.n_servers, topo.n_workers
            self.control.resumed_from = str(path) if path is not None else ""
            self.control.start()  # before the collective setup: health says NOT_SERVING
        self.layout = layout = layout_of(cfg)
        if cfg.finetune.max_norm > 0 and (topo.n_servers > 1 or cfg.ps.mode != "apply"):
            # the projection needs every weight column whole, on the rank that applies
            raise UserError('[finetune] max_norm needs one server rank and [ps] mode = "apply"')
        if cfg.ps.average != "none" and topo.n_servers > 1:
            # rank 0 evaluates and saves the average: it must hold the whole vector
            raise UserError("[ps] average needs one server rank (--servers 1)")
        self.data = data = load_data(cfg, data_dir)
        check_shards(cfg, len(data.y_train), topo.n_workers)
        self.init = initial_params(cfg, layout, data.X_train)
        self.split = "validation" if len(data.y_val) else "test"
        if topo.rank == 0:
            from dbnps.common.dbn import accuracy

            def evaluate_test(flat):
                return accuracy(layout.views(flat), data.X_test, data.y_test)

            def evaluate_val(flat):  # model selection: the held-out training images
                return accuracy(layout.views(flat), data.X_val, data.y_val)

            self.evaluate_test = evaluate_test
            self.evaluate = evaluate_val if self.split == "validation" else evaluate_test


if __name__ == "__main__":
    main()
