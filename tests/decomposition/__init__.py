"""Tests of clip_interpret's decomposition."""
