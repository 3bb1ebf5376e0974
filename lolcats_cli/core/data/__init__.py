"""Training and evaluation text: packing (``data``) and where it is read from (``data_sources``)."""
