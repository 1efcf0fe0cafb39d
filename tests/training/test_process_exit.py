"""How a launched qtune process ends (`qtune.distributed.exit_process`): its exit handlers run while
the interpreter is whole, its buffered output is flushed, its status is the command's, and a rank
that succeeded waits for the others before leaving the process group."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from support.launch import launch_env, launcher

SCRIPT = textwrap.dedent("""
    import atexit, os, sys, time
    from qtune.distributed import all_gather_objects, exit_process, init_process_group, launch

    out, code = sys.argv[1], int(sys.argv[2])
    rank = launch().rank
    init_process_group()
    assert all_gather_objects(rank) == [0, 1]
    atexit.register(lambda: open(os.path.join(out, f"atexit-{rank}"), "w").write("ran"))
    if rank == 1:
        time.sleep(1.0)  # rank 0 reaches the end first and waits for rank 1
        open(os.path.join(out, "rank1-done"), "w").write(str(time.time()))
    else:
        atexit.register(lambda: open(os.path.join(out, "rank0-left"), "w").write(str(time.time())))
    sys.stdout.write(f"rank {rank} says bye")  # no newline: only a flush shows it
    exit_process(code if rank == 1 else 0)
""")


def launch_script(tmp_path, code: int):
    script = tmp_path / "ends.py"
    script.write_text(SCRIPT, encoding="utf-8")
    out = tmp_path / f"out-{code}"
    out.mkdir()
    done = subprocess.run([*launcher(2), str(script), str(out), str(code)], env=launch_env(), capture_output=True,
                          text=True, timeout=120)
    return done, out


def test_a_launched_process_runs_its_exit_handlers_flushes_and_waits_for_the_others(tmp_path):
    done, out = launch_script(tmp_path, 0)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "atexit-0").read_text() == "ran" and (out / "atexit-1").read_text() == "ran"
    assert "rank 0 says bye" in done.stdout and "rank 1 says bye" in done.stdout
    # rank 0 left after rank 1 had finished its work (the barrier before leaving)
    assert float((out / "rank0-left").read_text()) >= float((out / "rank1-done").read_text())


def test_a_failed_rank_ends_with_its_status(tmp_path):
    done, out = launch_script(tmp_path, 3)
    assert done.returncode != 0
    assert "exitcode  : 3" in done.stderr
    assert (out / "atexit-1").read_text() == "ran"


def test_a_plain_process_exits_with_the_status(tmp_path):
    code = "from qtune.distributed import exit_process; print('plain', end=''); exit_process(4)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (4, "plain")
