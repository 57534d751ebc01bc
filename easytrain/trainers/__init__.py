"""Trainers: `BaseTrainer` and its subclasses."""

from easytrain.trainers.base import BaseTrainer

__all__ = ["BaseTrainer"]
