"""Who gets a request: balancing policies, peak EWMA, outlier ejection, hash keys."""
