"""ControlNet: preprocessors (annotators) and control units run inside our own sampling loop."""
