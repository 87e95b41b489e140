"""The algebra the passes rest on: folding per-channel maps into layers, composing conv chains, their cost, the padding plan."""
