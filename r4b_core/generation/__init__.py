"""Decoding: the token loop, generation config, chat-level generation and the thinking budget."""
