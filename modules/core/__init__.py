"""Torch-free domain: typed params, the generation pipeline, jobs, infotext, saving, options, flags, paths."""
