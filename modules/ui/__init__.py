"""The UI: the Gradio page, one module per tab, a thin face over the services and typed params."""
