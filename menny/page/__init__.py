"""What runs in the page's process (menny_the_sonic_whisperer.py): settings, transcription, the
transcript library, the views and the client of the microphone server."""
