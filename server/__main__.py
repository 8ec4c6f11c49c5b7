"""`python -m dbnps.server`: one parameter-server rank of an MPMD job (launched by psctl)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dbnps.common import rma
from dbnps.common.config import load
from dbnps.common.errors import UserError, exit_on_user_error
from dbnps.common.job import check_ranks, initial_params, layout_of, load_data


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
    from dbnps.server import checkpoint as ckpt
    from dbnps.server.server import ParameterServer

    cfg = load(config_path)
    topo = rma.Topology.discover("server")
    check_ranks(cfg, topo.n_workers, topo.n_servers)  # same verdict on every rank: no hang
    resumed = None
    if resume is not None:  # every server rank reads the file; rank 0 reports
        try:
            warn = (lambda m: print(m, file=sys.stderr, flush=True)) if topo.rank == 0 else None
            path, resumed = ckpt.find_resumable(resume, warn=warn or (lambda m: None))
            if resumed[0].shape != (layout_of(cfg).size,):
                raise UserError(
                    f"cannot resume from {path}: it holds {resumed[0].size} parameters, "
                    f"the config's network has {layout_of(cfg).size}"
                )
        except UserError as exc:  # the other ranks wait in collectives: take the job down
            print(f"error: {exc}", file=sys.stderr, flush=True)
            topo.comm.Abort(2)
        if topo.rank == 0:
            m = resumed[2]
            print(
                f"[server] resuming from {path}: phase {m['phase_name']}, version {m['version']}, "
                f"{m['samples_in_phase']} samples into the phase",
                flush=True,
            )
    control = None
    if topo.rank == 0 and (control_opts["run_dir"] or control_opts["grpc_port"] is not None):
        from dbnps.server.control import make_control_plane

        try:
            control = make_control_plane(cfg, out=out, **control_opts)
            control.restarts = restarts
            control.resumed_from = str(path) if resume is not None else ""
            control.start()  # before the collective setup: health says NOT_SERVING meanwhile
        except UserError as exc:  # the other ranks wait in collectives: take the job down
            print(f"error: {exc}", file=sys.stderr, flush=True)
            topo.comm.Abort(2)
    layout = layout_of(cfg)
    data = load_data(cfg, data_dir)
    init = initial_params(cfg, layout, data.X_train)
    evaluate = evaluate_test = None
    split = "validation" if len(data.y_val) else "test"
    if topo.rank == 0:
        from dbnps.common.dbn import accuracy

        def evaluate_test(flat):
            return accuracy(layout.views(flat), data.X_test, data.y_test)

        def evaluate(flat):  # model selection: the held-out training images if any
            return accuracy(layout.views(flat), data.X_val, data.y_val)

        evaluate = evaluate if split == "validation" else evaluate_test
    on_tick = control.on_tick if control is not None else None
    ps = ParameterServer(
        cfg,
        topo,
        layout,
        init,
        len(data.y_train),
        evaluate=evaluate,
        evaluate_test=evaluate_test,
        eval_split=split,
        on_tick=on_tick,
        resume=resumed,
    )
    if progress:
        ps.progress_every_s = 0.5
    periodic = None
    if topo.rank == 0 and (cfg.run.checkpoint_every_s > 0 or cfg.run.checkpoint_every_updates > 0):
        if control is not None:
            store = control.store
        else:
            folder = (out.parent if out is not None else Path.cwd()) / "checkpoints"
            store = ckpt.CheckpointStore(folder, keep=control_opts["keep_checkpoints"])
        periodic = ckpt.Periodic(
            store,
            every_s=cfg.run.checkpoint_every_s,
            every_updates=cfg.run.checkpoint_every_updates,
            job_id=control.job_id if control is not None else "",
        )
        periodic.start(ps.state.version)
        ps.checkpointer = periodic
    try:
        if control is not None:
            control.attach(ps)
        ps.run()
        if periodic is not None:
            periodic.close()
        if control is not None:
            control.after_run(ps)  # final checkpoint when stopped over gRPC
        ps.finish(out, summary)
    finally:
        if control is not None:
            control.close()


if __name__ == "__main__":
    main()
