"""LLM routing service: a model router (``service.router``) and its HTTP layer (``service.http``)."""

__version__ = "0.1.0"
