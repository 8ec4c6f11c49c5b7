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
