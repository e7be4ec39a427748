"""Deterministic triggers for tests that drive a real ``cnnkit`` process.

    python tests/childhooks.py HOOK [ARG ...] -- CNNKIT-ARGS ...

installs HOOK, then runs the cnnkit CLI with CNNKIT-ARGS as ``python -m cnnkit`` would. A hook
wraps one cnnkit function, calls through to it, and acts at an exact point of the run, so a test
no longer guesses with a sleep when a step, a save or a decode is under way. Nothing in cnnkit
knows about these hooks.

  signal-after-step EPOCH STEP SIGNAL
      after training step STEP (1-based) of epoch EPOCH (1-based) ends, the process sends
      itself SIGNAL (SIGINT, SIGTERM...), as a terminal or a scheduler would
  kill-in-save N
      in the N-th save of a checkpoints/last.pt, once its temporary file is written and before
      it replaces last.pt, the process SIGKILLs itself (a crash in the middle of a save)
  gate-decode DIR
      the server's decode of an uploaded image whose name starts with "gate" first creates
      DIR/entered, then waits until DIR/release exists (a decode as slow as the test wants)
  share-trials DIR NAME
      for two ``cnnkit tune`` processes on one study: each training run (trial) first creates
      DIR/NAME; after its first trial, a process waits until the other name (a or b) exists,
      so both take part whatever their start-up times
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def signal_after_step(epoch: str, step: str, signame: str) -> None:
    from cnnkit.engine import loop

    train_step, seen = loop._train_step, {"epochs": 0}
    target = (int(epoch), int(step) - 1)

    def counted(model, images, labels, tools, rt, step: int = 0):
        out = train_step(model, images, labels, tools, rt, step)
        seen["epochs"] += step == 0
        if (seen["epochs"], step) == target:
            os.kill(os.getpid(), signal.Signals[signame])
        return out

    loop._train_step = counted


def kill_in_save(n: str) -> None:
    replace, saves = os.replace, {"count": 0}

    def replace_or_die(src, dst, *args, **kwargs):
        if Path(dst).name == "last.pt" and Path(src).name.startswith(".last.pt."):
            saves["count"] += 1
            if saves["count"] == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst, *args, **kwargs)

    os.replace = replace_or_die  # fileio calls os.replace; only this child process is changed


def gate_decode(folder: str) -> None:
    from cnnkit.deploy import server

    decode, gate = server.decode_checked, Path(folder)

    def gated(img, name, mode):
        if name.startswith("gate"):
            (gate / "entered").touch()
            end = time.monotonic() + 120
            while not (gate / "release").exists() and time.monotonic() < end:
                time.sleep(0.01)
        return decode(img, name, mode)

    server.decode_checked = gated


def share_trials(folder: str, name: str) -> None:
    from cnnkit import run

    train, gate, done = run.train, Path(folder), {"trials": 0}
    other = gate / ("b" if name == "a" else "a")

    def shared(*args, **kwargs):
        (gate / name).touch()
        if done["trials"] == 1:  # let the other process start a trial before taking more
            end = time.monotonic() + 120
            while not other.exists() and time.monotonic() < end:
                time.sleep(0.05)
        done["trials"] += 1
        return train(*args, **kwargs)

    run.train = shared


HOOKS = {
    "signal-after-step": signal_after_step,
    "kill-in-save": kill_in_save,
    "gate-decode": gate_decode,
    "share-trials": share_trials,
}

if __name__ == "__main__":
    split = sys.argv.index("--")
    name, *args = sys.argv[1:split]
    HOOKS[name](*args)
    from cnnkit.cli.main import main

    sys.argv = ["cnnkit", *sys.argv[split + 1 :]]
    main()
