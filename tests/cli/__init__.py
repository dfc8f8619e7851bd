"""Tests of clip_interpret's cli."""
