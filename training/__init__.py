"""Training the AMED predictor: the network (networks.py), the losses (loss.py), the loop
(training_loop.py), run folders (experiments.py), predictor files (snapshot.py, legacy.py) and the
launch of a run from its options (launch.py)."""
