"""A small world with ground truth, the instruments that read it, and the recipe that trains the embedded models.

- `world`: procedural videos (coloured shapes moving on simple backgrounds) with per-frame ground truth and captions.
"""
