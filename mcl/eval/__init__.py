"""Offline evaluation of a pre-trained checkpoint: `python -m mcl.eval.linear|knn ckpt_path=...`."""
