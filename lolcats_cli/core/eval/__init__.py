"""Evaluation of a run (``evaluate``, ``eval_rows``): perplexity rows, passkey retrieval (``passkey``) and
lm-eval-harness tasks (``lm_eval_bridge``)."""
