"""The bundled demo: a small Mixtral-architecture MoE trained on the five-domain corpus
(``model``: loading it and its predictor; ``run``: ``expertflow demo``; ``training``: how the
bundled assets were made; ``assets/``)."""
