"""Feature-caching two-stage transfer learning: extract once, train many heads."""

__version__ = "0.1.0"


class PipelineError(Exception):
    """An error a user can fix; the CLI prints its message without a traceback."""
