"""Deciding on evidence: the promotion gates relative to the champion, the one decision both quantization tracks
make (rank the passing candidates, register the best, alias it @challenger), the @shadow deployment and its
review, and promotion to @champion or rollback to @previous."""
