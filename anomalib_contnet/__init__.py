"""anomalib-contnet."""
