"""Extra networks applied to a loaded model: LoRA and the LyCORIS family merged into the weights
(``merge``), their files' key layouts (``keys``), each network type's weight change (``deltas``),
activation from prompt tags (``activation``) and hypernetworks (``hypernetwork``)."""
