"""What runs in the microphone server's process (audio_server.py): recording, clip files, levels."""
