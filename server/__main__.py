"""`python -m dbnps.server`: one parameter-server rank of an MPMD job (launched by psctl)."""

from __future__ import annotations

from pathlib import Path

import click

from dbnps.common import rma
from dbnps.common.config import load
from dbnps.common.errors import exit_on_user_error
from dbnps.common.job import initial_params, layout_of, load_data


@click.command()
@click.option("--config", "config_path", type=click.Path(), default=None)
@click.option("--data-dir", default=None)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="model file (.npz)")
@click.option("--summary", type=click.Path(path_type=Path), default=None, help="summary JSON")
@exit_on_user_error
def main(config_path, data_dir, out, summary) -> None:
    from dbnps.server.server import ParameterServer

    cfg = load(config_path)
    topo = rma.Topology.discover("server")
    layout = layout_of(cfg)
    data = load_data(cfg, data_dir)
    init = initial_params(cfg, layout, data.X_train)
    evaluate = None
    if topo.rank == 0:
        from dbnps.common.dbn import accuracy

        X_test, y_test = data.X_test, data.y_test
        evaluate = lambda flat: accuracy(layout.views(flat), X_test, y_test)  # noqa: E731
    ps = ParameterServer(cfg, topo, layout, init, len(data.y_train), evaluate=evaluate)
    ps.run()
    ps.finish(out, summary)


if __name__ == "__main__":
    main()
