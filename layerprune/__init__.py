"""layerprune: find the decoder block that matters least in one language, cut it out, measure."""
