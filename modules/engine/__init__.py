"""The diffusion engine: sampling loop, conditioning, prompt grammar, noise, previews, sampler catalog."""
