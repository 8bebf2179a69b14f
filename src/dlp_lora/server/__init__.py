"""OpenAI-compatible HTTP server with mixed-task batching (`dlp-lora serve`)."""

from dlp_lora.server.app import create_app, serve

__all__ = ["create_app", "serve"]
