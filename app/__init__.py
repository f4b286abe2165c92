"""The Gradio front end (``python -m app.app``); all logic lives in ``toolkit``."""
