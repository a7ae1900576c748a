"""Open weights in and out: Hugging Face directories (hf.py)."""
