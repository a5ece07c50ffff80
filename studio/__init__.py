"""The Gradio studio: UI only, calling backend functions (to come)."""
