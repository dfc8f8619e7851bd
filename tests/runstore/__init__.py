"""Tests of clip_interpret's runstore."""
