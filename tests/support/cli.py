"""Running the qtune CLI in-process and checking its user errors."""

from __future__ import annotations

from pathlib import Path

from qtune.cli import main

MISSING_MODEL = "/nonexistent/model"  # a model that cannot load: commands must fail on the data first


def run(capsys, *argv) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr) of this call only."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *parts: str) -> None:
    assert code == 2, err
    assert err.startswith("qtune: error: "), err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, f"{part!r} not in {err!r}"


def assert_data_accepted_up_to_the_model(capsys, task: str, data_args, output: Path) -> None:
    """The control for `assert_refused_before_the_model_loads`: valid data gets as far as the model."""
    code, _, err = run(capsys, "train", task, "--model", MISSING_MODEL, *data_args, "--output", output,
                       "--device", "cpu")
    assert_user_error(code, err, MISSING_MODEL)
    assert not output.exists()


def assert_refused_before_the_model_loads(capsys, task: str, data_args, output: Path, *parts: str) -> None:
    """`qtune train TASK` with MISSING_MODEL exits 2 on the data (error naming `parts`), writes nothing."""
    code, _, err = run(capsys, "train", task, "--model", MISSING_MODEL, *data_args, "--output", output,
                       "--device", "cpu")
    assert_user_error(code, err, *parts)
    assert MISSING_MODEL not in err  # the data was checked first
    assert not output.exists()
