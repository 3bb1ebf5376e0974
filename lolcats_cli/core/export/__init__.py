"""Exports of a finished run: the adapter format (``export``) and the self-contained Hugging Face folder
(``export_hf``)."""
