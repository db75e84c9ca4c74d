"""Distributed contrastive self-supervised pretraining: data, methods, engines, evaluation."""
