"""Test-wide settings: never reach the Hugging Face Hub (a hub call would hang for tens of seconds)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
