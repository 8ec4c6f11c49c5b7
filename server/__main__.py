"""`python -m dbnps.server`: one parameter-server rank of an MPMD job (launched by psctl)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dbnps.common import rma
from dbnps.common.config import load
from dbnps.common.errors import UserError, exit_on_user_error
from dbnps.common.job import initial_params, layout_of, load_data


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
@exit_on_user_error
def main(config_path, data_dir, out, summary, **control_opts) -> None:
    from dbnps.server.server import ParameterServer

    cfg = load(config_path)
    topo = rma.Topology.discover("server")
    control = None
    if topo.rank == 0 and (control_opts["run_dir"] or control_opts["grpc_port"] is not None):
        from dbnps.server.control import make_control_plane

        try:
            control = make_control_plane(cfg, out=out, **control_opts)
            control.start()  # before the collective setup: health says NOT_SERVING meanwhile
        except UserError as exc:  # the other ranks wait in collectives: take the job down
            print(f"error: {exc}", file=sys.stderr, flush=True)
            topo.comm.Abort(2)
    layout = layout_of(cfg)
    data = load_data(cfg, data_dir)
    init = initial_params(cfg, layout, data.X_train)
    evaluate = None
    if topo.rank == 0:
        from dbnps.common.dbn import accuracy

        X_test, y_test = data.X_test, data.y_test
        evaluate = lambda flat: accuracy(layout.views(flat), X_test, y_test)  # noqa: E731
    on_tick = control.on_tick if control is not None else None
    ps = ParameterServer(
        cfg, topo, layout, init, len(data.y_train), evaluate=evaluate, on_tick=on_tick
    )
    try:
        if control is not None:
            control.attach(ps)
        ps.run()
        if control is not None:
            control.after_run(ps)  # final checkpoint when stopped over gRPC
        ps.finish(out, summary)
    finally:
        if control is not None:
            control.close()


if __name__ == "__main__":
    main()
