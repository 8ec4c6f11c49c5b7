"""`config`: defaults, TOML loading, and one-line errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbnps.common import config
from dbnps.common.errors import ConfigError, UserError


def test_defaults() -> None:
    cfg = config.load(None)
    assert cfg.model.sizes == [784, 500, 500, 2000]
    assert cfg.model.classes == 10
    assert cfg.ps.update_rule == "momentum"
    assert cfg.pretrain.lr == 0.1
    assert cfg.data.dir == ""
    d = cfg.to_dict()
    assert set(d) == {"model", "data", "pretrain", "finetune", "ps", "run"}
    assert config.from_dict(d) == cfg  # round trip


def test_load_toml(tmp_path: Path) -> None:
    p = tmp_path / "job.toml"
    p.write_text(
        "[model]\nsizes = [784, 64]\n\n"
        "[pretrain]\nlr = 1\nepochs = 2\npersistent = true\n\n"
        '[ps]\nupdate_rule = "adagrad"\nn_push = 4\n'
    )
    cfg = config.load(p)
    assert cfg.model.sizes == [784, 64]
    assert cfg.pretrain.lr == 1.0 and isinstance(cfg.pretrain.lr, float)
    assert cfg.pretrain.epochs == 2.0
    assert cfg.pretrain.persistent is True
    assert cfg.ps.update_rule == "adagrad"
    assert cfg.ps.n_push == 4
    assert cfg.finetune.lr == 0.1  # untouched sections keep defaults


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"modle": {}}, "[modle]"),
        ({"model": {"layers": [784, 10]}}, "[model] layers"),
        ({"pretrain": {"lr": -0.1}}, "[pretrain] lr"),
        ({"ps": {"staleness_lr": "half"}}, "[ps] staleness_lr"),
        ({"ps": {"staleness_lr": "compensate", "mode": "accumulate"}}, "[ps] staleness_lr"),
        ({"ps": {"split_batch": "maybe"}}, "[ps] split_batch"),
        ({"ps": {"accumulate_momentum": "global"}}, "[ps] accumulate_momentum"),
        ({"ps": {"average_eval_live": "no"}}, "[ps] average_eval_live"),
        ({"ps": {"split_batch": True, "mode": "accumulate"}}, "[ps] split_batch"),
        ({"finetune": {"lr": 0}}, "[finetune] lr"),
        ({"pretrain": {"lr": "fast"}}, "[pretrain] lr"),
        ({"pretrain": {"lr": float("nan")}}, "[pretrain] lr"),
        ({"pretrain": {"batch_size": 1.5}}, "[pretrain] batch_size"),
        ({"pretrain": {"batch_size": True}}, "[pretrain] batch_size"),
        ({"pretrain": {"persistent": 1}}, "[pretrain] persistent"),
        ({"model": {"sizes": [784, "500"]}}, "[model] sizes"),
        ({"model": {"sizes": [100, 500]}}, "[model] sizes[0]"),
        ({"ps": {"update_rule": "adam"}}, "[ps] update_rule"),
        ({"ps": {"update_rule": 3}}, "[ps] update_rule"),
        ({"ps": {"n_fetch": 0}}, "[ps] n_fetch"),
        ({"ps": "momentum"}, "[ps]"),
        ({"finetune": {"dropout": 1.0}}, "[finetune] dropout"),
    ],
)
def test_bad_values_name_the_key(raw: dict, named: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.from_dict(raw)
    msg = str(exc.value)
    assert named in msg
    assert "\n" not in msg
    assert isinstance(exc.value, UserError)


def test_bad_update_rule_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="sgd, momentum, adagrad"):
        config.from_dict({"ps": {"update_rule": "adam"}})


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nsizes = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[pretrain]\nlr = -1.0\n")
    with pytest.raises(ConfigError, match=r"\[pretrain\] lr must be > 0"):
        config.load(wrong)


def test_every_shipped_config_loads_and_chains():
    """configs/*.toml (the README's and the demo's) stay valid as the schema evolves."""
    from pathlib import Path

    from dbnps.common.config import load
    from dbnps.common.job import layout_of

    paths = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
    assert {p.name for p in paths} >= {"demo.toml", "mnist-dbn.toml", "small.toml"}
    for p in paths:
        cfg = load(p)
        assert layout_of(cfg).size > 0, p
