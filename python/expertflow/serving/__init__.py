"""Serving: batched generation and the token scheduler that regroups requests by predicted
routing path.

``generation`` (:func:`~expertflow.serving.generation.generate_batch`, the loop) is built from
``requests`` (a request's lifecycle), ``kv_rows`` (a batch's KV rows and their regrouping
moves), ``cache_adapter`` (transformers' DynamicCache over them), ``model_calls`` (prefill and
decode forward calls), ``routing_tap``, ``sampling`` and ``regrouping``; ``scheduler`` holds
the native two-batch split."""
