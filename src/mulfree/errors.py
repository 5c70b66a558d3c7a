"""The MulfreeError family: every user-facing failure says what is wrong and what to do."""


class MulfreeError(Exception):
    """An error caused by the user's input or environment, printed as one line by the CLI.

    Args:
        what: what is wrong ("data file 'x.txt' is empty").
        hint: what to do about it ("pass a text file with at least 1 kB of text").
    """

    def __init__(self, what: str, hint: str = ""):
        self.what = what
        self.hint = hint
        super().__init__(f"{what}; {hint}" if hint else what)


class ConfigError(MulfreeError):
    """A bad model or run configuration (unknown preset, inconsistent sizes)."""


class DataError(MulfreeError):
    """Missing, empty or malformed input data."""


class CheckpointError(MulfreeError):
    """A missing, corrupt or mismatched model directory or checkpoint."""
