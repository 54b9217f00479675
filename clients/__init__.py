"""Python SDK for clasp-serve (sync and asyncio) and a command line client."""
