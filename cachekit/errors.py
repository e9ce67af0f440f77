"""One exception type for every user-facing failure.

The CLI turns a CachekitError into a one-line ``Error: ...`` with exit code 1 and no traceback,
so the message must name the problem *and* the fix.
"""


class CachekitError(Exception):
    """A problem the user can fix; the message is one line: what is wrong; fix: what to do."""


class BadImageError(CachekitError):
    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = str(reason).splitlines()[0] if str(reason) else type(reason).__name__
        super().__init__(
            f"cannot read image {self.path}: {self.reason}; fix: replace or remove the file, "
            "or rerun with --skip-bad to record it and continue"
        )


class CacheInUseError(CachekitError):
    pass
