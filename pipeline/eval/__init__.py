"""Feature-quality protocols: weighted kNN, linear probe, fine-tuning, embedding maps, reports."""
