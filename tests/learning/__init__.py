"""Tests of the training, prediction and acquisition domain logic."""
