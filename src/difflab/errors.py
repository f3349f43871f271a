"""The exception types for user mistakes, and the exit codes of the ``difflab`` command.

Anything a user can cause (a bad path, a corrupt file, a size that does not fit the model, an unknown
option) raises :class:`DifflabError` with a one-line message naming the problem. The CLI prints that
line and exits with its ``exit_code`` -- never a stack trace for a user mistake:

    0    done
    1    a bug in difflab (a stack trace: please report it)
    2    a user mistake, a damaged file, a folder that cannot be written, a run that cannot go on
    130  stopped by Ctrl-C or SIGTERM (a checkpoint was saved when the message says so), as shells expect
"""


class DifflabError(Exception):
    """A user-facing error: the message is one line that says what is wrong and how to fix it.

    ``all_ranks=True`` marks an error that every process of a torchrun job raises together (an interrupt,
    a diverged run): only rank 0 prints it."""

    exit_code = 2

    def __init__(self, message: str = "", *, all_ranks: bool = False):
        super().__init__(message)
        self.all_ranks = all_ranks


class Interrupted(DifflabError):
    """Training stopped on Ctrl-C or SIGTERM (after saving a checkpoint); exit code 130 like any interrupted
    command."""

    exit_code = 130
