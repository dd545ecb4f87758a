"""Run pipeline code in a child process: to kill it (-9, Ctrl-C) or to keep a failure out of the test process.

Children come from a forkserver that imported torch (and matplotlib) once, so each starts in ~50 ms
instead of seconds, and none inherits the test process's threads.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

# The reports' libraries too (matplotlib, the report modules): the run-folder tests draw them in every
# child they kill, and importing matplotlib costs ~1 s per child on a busy machine.
PRELOAD = ["torch", "torchvision", "h5py", "PIL.Image", "pipeline.extract", "pipeline.head", "pipeline.logistic",
           "pipeline.finetune", "pipeline.rundir", "run_pipeline", "matplotlib.figure", "matplotlib.ticker",
           "matplotlib.backends.backend_agg", "matplotlib.patches", "pipeline.plots", "pipeline.report",
           "pipeline.class_report", "pipeline.sweep_stage", "pipeline.sweep_report"]


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


def flip_sweep(path: str, kind: str, step: int, config_key: str = "", dtype: str = "float32") -> dict:
    """Flip one byte at every step-th offset of a copy of the file at path and read it back as `kind`
    (cache, chunk, scan); {"detected": offsets where the damage was reported as damage,
    "escaped": offset -> exception other than CacheError}. In a child: h5py may abort on odd damage."""
    import shutil

    import numpy as np

    from pipeline import cache as fc
    from pipeline.scan_index import read_scan_index

    src = Path(path)
    work = src.with_name(f"flipped-{src.name}")
    detected, escaped = [], {}
    for offset in range(0, src.stat().st_size, step):
        shutil.copyfile(src, work)
        with open(work, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x5A]))
        try:
            if kind == "cache":
                fc.read_attrs(work)
                intact = fc.is_intact(work)
                with fc.open_features(work) as reader:
                    for split in reader.splits.values():
                        split.read_rows(0, split.n_rows, np.empty((split.n_rows, split.feature_dim), np.float32))
                fc.read_cache(work)
                fc.feature_shapes(work)
                if not intact:
                    escaped[offset] = "is_intact() is False but every read succeeded"
            elif kind == "chunk":
                fc.ChunkStore(work.parent, config_key, dtype).read_chunk(work)
            elif kind == "scan":
                if read_scan_index(work) == {}:
                    detected.append(offset)
        except fc.CacheError:
            detected.append(offset)
        except BaseException as e:  # noqa: BLE001 - what the test is looking for
            escaped[offset] = f"{type(e).__name__}: {e}"
    work.unlink()
    return {"detected": detected, "escaped": escaped}


def head(overrides: list[str]) -> dict:
    """run_head for load_config(None, overrides): the metrics entry (without its history)."""
    import torch

    from pipeline.config import load_config
    from pipeline.head import run_head

    entry = run_head(load_config(None, overrides), torch.device("cpu"))
    return {k: v for k, v in entry.items() if k != "history"}


def pool_worker_then_wait(pid_file: str) -> None:
    """What benchmark.measure does, in a process the test kills: a spawned worker that exits with its
    parent; the worker's pid goes to pid_file, then the worker sleeps (the parent waits for it)."""
    import multiprocessing as mp_
    from concurrent.futures import ProcessPoolExecutor

    from pipeline.fsutil import exit_with_parent

    with ProcessPoolExecutor(1, mp_context=mp_.get_context("spawn"), initializer=exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        Path(pid_file).write_text(str(pool.submit(os.getpid).result()))
        pool.submit(time.sleep, 600).result()
