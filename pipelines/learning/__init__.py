"""Learning from feedback: the nearline updater (online steps between batch runs) and the
batch retrain of the ranker."""
