"""Image generation, the library behind sample.py (:mod:`generation.generate`)."""
