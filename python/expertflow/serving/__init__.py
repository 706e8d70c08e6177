"""Serving: batched generation (``generation``) and the token scheduler that regroups requests
by predicted routing path (``scheduler``)."""
