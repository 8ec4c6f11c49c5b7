"""`psctl run` on a terminal: a progress bar per phase, plain log lines, no banner (real job, pty)."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

from conftest import write_config


def test_progress_bars_on_a_terminal(tmp_path):
    cfg = write_config(
        tmp_path / "p.toml",
        {
            "model": {"sizes": [784, 64]},
            "data": {"train_subset": 3000, "test_subset": 500},
            "pretrain": {"epochs": 2.0, "batch_size": 20},
            "finetune": {"epochs": 6.0, "batch_size": 20},
            "run": {"eval_every_epochs": 1.0},
        },
    )
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    psctl = Path(sys.executable).parent / "psctl"
    argv = [psctl, "run", "--config", cfg, "--workers", "2", "--run-dir", tmp_path / "run"]
    proc = subprocess.Popen(argv, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer closed the pty
            break
        if not data:
            break
        chunks.append(data)
    rc = proc.wait(timeout=120)
    out = b"".join(chunks).decode(errors="replace")
    assert rc == 0, out[-3000:]
    bars = [line for line in out.replace("\r", "\n").split("\n") if "img/s" in line]
    assert any(b.startswith("pretrain-1 1/2:") for b in bars), out[-3000:]
    # The fine-tuning bar carries the current accuracy next to the rate and ETA.
    assert any(b.startswith("finetune 2/2:") and "test acc 0." in b for b in bars), bars[-5:]
    assert "[progress]" not in out and "post-failure" not in out and "\x00" not in out
    assert "psctl: done" in out


def test_sigterm_to_psctl_run_stops_the_job(tmp_path):
    """A batch system (or a closed terminal) that ends `psctl run` ends its ranks too."""
    import signal

    import psutil

    cfg = write_config(
        tmp_path / "long.toml",
        {
            "model": {"sizes": [784, 64]},
            "data": {"train_subset": 3000, "test_subset": 500},
            "pretrain": {"epochs": 2.0, "batch_size": 20},
            "finetune": {"epochs": 5000.0, "batch_size": 20},
        },
    )
    psctl = Path(sys.executable).parent / "psctl"
    argv = [psctl, "run", "--config", cfg, "--workers", "2", "--run-dir", tmp_path / "run"]
    argv.append("--no-progress")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # until fine-tuning: every rank is up and training
        lines.append(line)
        if "phase finetune starts" in line:
            break
    ranks = psutil.Process(proc.pid).children(recursive=True)
    workers = [p for p in ranks if p.name().startswith("python") and "dbnps.worker" in p.cmdline()]
    assert len(workers) == 2, lines
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0
    assert "SIGTERM: the job was stopped" in out, out[-2000:]
    _, alive = psutil.wait_procs(ranks, timeout=30)
    for p in alive:  # a failing run must not leave a 5000-epoch job behind
        p.kill()
    assert not alive, [p.pid for p in alive]  # bound: 30 s for mpiexec to end them
