"""Metrics of image sets: image sets and errors shared by the commands (image_sets.py), Frechet
distances (frechet.py), the CLIP score (clip_score.py) and the provenance of metric values
(provenance.py)."""
