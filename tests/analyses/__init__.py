"""Tests of clip_interpret's analyses."""
