"""The HTTP side: one FastAPI app over a backend (this machine's engine, or an upstream
server), with a router per API family (page, tokenize, OpenAI, EleutherAI)."""

from gptj.serve.app import create_app, create_upstream_app

__all__ = ["create_app", "create_upstream_app"]
