"""The OpenAI-compatible HTTP API: a thin gateway that translates to the decoder's gRPC API."""
