"""The gateway: an OpenAI-compatible FastAPI server that mixes K ensemble members.

Never imports torch: the members run in vLLM (production) or behind the engine interface.
"""
