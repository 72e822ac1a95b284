"""Ray Serve app that serves LLMs via vLLM."""
