"""lolcats: linearize pretrained Transformer LLMs with the LoLCATs method."""

__version__ = "0.1.0"
