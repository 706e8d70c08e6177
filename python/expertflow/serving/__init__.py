"""Serving: batched generation, the token scheduler that regroups requests by predicted
routing path, and what ``expertflow chat``, ``generate`` and ``serve`` run on.

``generation`` (:func:`~expertflow.serving.generation.generate_batch`, the loop) is built from
``requests`` (a request's lifecycle), ``kv_rows`` (a batch's KV rows and their regrouping
moves), ``cache_adapter`` (transformers' DynamicCache over them), ``model_calls`` (prefill and
decode forward calls), ``routing_tap``, ``sampling`` and ``regrouping``; ``scheduler`` holds
the native two-batch split. ``engine`` drives the same loop one round at a time for requests
that arrive one by one; ``streaming`` (a reply's tokens and final text), ``loading`` (a model
and its tokenizer and generation defaults) and ``chat_format`` serve the commands; ``worker``,
``server``, ``openai_api`` and ``metrics`` are ``expertflow serve`` (only ``server`` imports
FastAPI, and nothing imports it but the ``serve`` command)."""
