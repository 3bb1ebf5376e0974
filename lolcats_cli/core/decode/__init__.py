"""Decoding: the cache transformers' generate uses (``generation``, ``cache``), static CUDA-graph decoding
(``static_decode``) and ``lolcats chat`` (``chat``, ``chat_stats``, ``repl``)."""
