"""Menny's shared application code: the page and the microphone server stay thin on top of it."""
