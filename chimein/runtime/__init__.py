"""Runtime: the trained assistant in a chat. After each message it decides in one forward pass
whether to speak, and replies only then; many conversations are decided together in one packed
pass; the HTTP server (its own API and an OpenAI-compatible endpoint) keeps the conversations."""
