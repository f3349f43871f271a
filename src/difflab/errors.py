"""The one exception type for user mistakes.

Anything a user can cause (a bad path, a corrupt file, a size that does not fit the model, an unknown
option) raises :class:`DifflabError` with a one-line message naming the problem. The CLI prints that
line and exits with status 2 — never a stack trace for a user mistake.
"""


class DifflabError(Exception):
    """A user-facing error: the message is one line that says what is wrong and how to fix it.

    ``all_ranks=True`` marks an error that every process of a torchrun job raises together (an interrupt,
    a diverged run): only rank 0 prints it."""

    def __init__(self, message: str = "", *, all_ranks: bool = False):
        super().__init__(message)
        self.all_ranks = all_ranks
