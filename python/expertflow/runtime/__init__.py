"""The runtime: the expert cache, offloading a model onto it, loading a checkpoint straight into
it, and the prefetching that drives it.

``cache`` (ExpertCache), ``experts`` (finding experts modules), ``offloaded`` (the module an
offloaded layer runs), ``offload`` / ``pretrained`` (``offload``, ``from_pretrained``,
``restore``), ``options`` and ``state`` (what they take and leave), ``policies`` (the names the
core implements), ``routing`` (reading a routed layer's call), ``prefetch``, ``memory``
(``memory_report``), ``checkpoint`` (safetensors shards).
"""
