"""Tests of clip_interpret's app."""
