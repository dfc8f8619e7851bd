"""Tests of clip_interpret's models."""
