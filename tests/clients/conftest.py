"""The server tests' ``gateway`` fixture: a real gateway app on a fake vLLM."""

from tests.server.conftest import gateway  # noqa: F401
