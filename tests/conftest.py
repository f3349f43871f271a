"""Shared test helpers."""

import pytest

from difflab.cli import main


def pytest_addoption(parser):
    parser.addoption("--run-compile", action="store_true",
                     help="also run the torch.compile checks (minutes on a CPU; benchmarks/gpu_check.sh runs them on a "
                          "GPU)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-compile"):
        return
    skip = pytest.mark.skip(reason="a torch.compile check: minutes on a CPU, run on the GPU by benchmarks/gpu_check.sh "
                                   "(or pytest --run-compile)")
    for item in items:
        if "compile" in item.keywords:
            item.add_marker(skip)


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
