"""Models: find and load them (``models``, ``hub``, ``gguf_cache``), their shape without weights
(``model_facts``), what can be linearized (``architectures``), the swap of the attentions (``convert``), the
attention module (``linear_attention``), layers kept softmax (``softmax_layers``) and plugins by name
(``registry``)."""
