"""``gptlab serve``: a chat web page and an OpenAI-compatible API over one loaded model."""

from gptlab.serve.app import create_app, run_server

__all__ = ["create_app", "run_server"]
