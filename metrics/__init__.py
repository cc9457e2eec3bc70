"""Metrics of image sets beyond the FID library: the CLIP score and the provenance of metric values."""
