"""Run pipeline code in a child process: to kill it (-9, Ctrl-C) or to keep a failure out of the test process.

Children come from a forkserver that imported torch once, so each starts in ~50 ms instead of
seconds, and none inherits the test process's threads.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

PRELOAD = ["torch", "torchvision", "h5py", "PIL.Image", "pipeline.extract", "pipeline.head", "pipeline.logistic",
           "pipeline.finetune", "pipeline.rundir", "run_pipeline"]


def context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _log_forward_passes(log_path: Path, pause: float) -> None:
    """Append the batch size of every forward pass to log_path (O_APPEND writes survive kill -9),
    then sleep `pause` seconds, so a test can keep an extraction running."""
    import pipeline.extract as ex

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    build = ex.build_feature_extractor

    def build_logged(*args, **kwargs):
        extractor = build(*args, **kwargs)
        forward = extractor.forward

        def logged(x):
            y = forward(x)
            os.write(fd, f"{len(x)}\n".encode())
            time.sleep(pause)
            return y

        extractor.forward = logged
        return extractor

    ex.build_feature_extractor = build_logged


def run_cli(argv: list[str], out_path: str, log_path: Optional[str] = None, own_group: bool = False,
            pause: float = 0.0) -> None:
    """run_pipeline.main(argv) with stdout+stderr to out_path; exit with its return code.

    log_path: log each forward pass there, pausing `pause` seconds after each.
    """
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    if own_group:
        os.setpgrp()  # so Ctrl-C can reach the whole group (DataLoader workers too), as in a terminal
    if log_path:
        _log_forward_passes(Path(log_path), pause)
    import run_pipeline

    sys.exit(run_pipeline.main(argv))


def run_cli_killed_at_rename(argv: list[str], out_path: str, kill_at: int) -> None:
    """run_cli, but the process SIGKILLs itself at the kill_at-th rename of a run-folder publish
    (pipeline.rundir._rename), before that rename happens."""
    import signal

    import pipeline.rundir as rundir

    rename, calls = rundir._rename, []

    def rename_or_die(src, dst):
        calls.append(dst)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        rename(src, dst)

    rundir._rename = rename_or_die
    run_cli(argv, out_path)


def start(target: Callable, *args: Any) -> mp.Process:
    p = context().Process(target=target, args=args)
    p.start()
    return p


def _call(conn, fn: Callable, args: tuple) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("error", (type(e).__name__, str(e), traceback.format_exc())))
    conn.close()


def call(fn: Callable, *args: Any, timeout: float = 300) -> tuple[str, Any]:
    """("ok", fn(*args)) or ("error", (type name, message, traceback)) from a child process."""
    ctx = context()
    receive, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_call, args=(send, fn, args))
    p.start()
    send.close()
    try:
        if not receive.poll(timeout):
            raise TimeoutError(f"{fn.__name__} did not finish in {timeout} s")
        return receive.recv()
    finally:
        receive.close()
        p.join(timeout)


def extract(overrides: list[str]) -> dict:
    """run_extract for load_config(None, overrides): the metrics entry."""
    import torch

    from pipeline.config import load_config
    from pipeline.extract import run_extract

    return run_extract(load_config(None, overrides), torch.device("cpu"))
