"""One exception tree. The CLI maps each subclass to its exit code and prints one line."""


class TinypruneError(Exception):
    exit_code = 1


class InputError(TinypruneError):
    """Bad input or usage: missing dir, not a pipeline, out-of-range sparsity, unknown target."""

    exit_code = 2


class GateFailed(TinypruneError):
    """A drift, quality, latency or verify gate failed. Carries the result so --json can still print it."""

    exit_code = 1

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result


class BackendMissing(TinypruneError):
    """A required optional backend (tensorrt, CUDA) is not available here."""

    exit_code = 3
