"""Recorded routing: the trace format (``format``), recording it from a model (``recording``),
replaying it through the cache policies under a timing model (``replay``) and its statistics
(``stats``)."""

from expertflow.traces.format import Trace, TraceError, load_trace, save_trace

__all__ = ["Trace", "TraceError", "load_trace", "save_trace"]
