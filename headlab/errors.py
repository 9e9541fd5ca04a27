"""The one exception type users see: a one-line message saying what is wrong and how to fix it."""


class HeadlabError(Exception):
    """Bad input or state that the user can fix. The CLI prints ``error: <message>`` and exits with status 2.

    Messages name the bad value and the fix, on one line, e.g.
    ``dataset file 'x.jsonl' has no field 'label'; pass --label_field with one of: text, answer``.
    """


def require(condition: bool, message: str) -> None:
    """Raise :class:`HeadlabError` with ``message`` unless ``condition`` holds (config and input checks)."""
    if not condition:
        raise HeadlabError(message)


def at_least(option: str, value: float | None, minimum: float, *, optional: bool = False) -> None:
    """``--option`` must be at least ``minimum`` (or unset, with ``optional``): a one-line error naming both."""
    if value is None and optional:
        return
    require(value is not None and value >= minimum,
            f"--{option} {value} is out of range: it must be at least {minimum}")


class Interrupted(BaseException):
    """A signal stopped the run (SIGTERM from SLURM/Kubernetes, or SIGINT). Not an :class:`Exception`, so that
    ``except Exception`` blocks let it through, like :class:`KeyboardInterrupt`.

    The CLI ends with the conventional exit code ``128 + signum`` (143 for SIGTERM, 130 for SIGINT) and one line
    saying what was interrupted and how to resume. Code that holds resumable state (a sweep's running trial, a
    half-written shard) catches it, leaves that state resumable, and re-raises.
    """

    def __init__(self, signum: int):
        import signal

        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
