"""Shared test helpers."""

import pytest

from difflab.cli import main


@pytest.fixture
def one_line(capsys):
    """``one_line(argv, *fragments)``: run the CLI, expect exit code 2 and a one-line ``difflab: error:`` naming
    every fragment (no stack trace anywhere on stderr); returns that line."""

    def run(argv, *fragments) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("difflab: error:") and "Traceback" not in "\n".join(err), err
        for fragment in fragments:
            assert fragment in err[-1], err[-1]
        return err[-1]

    return run
