"""Mining strategies: positives from the bank, negatives from the InfoNCE gradient."""
