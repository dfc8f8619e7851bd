"""Tests of clip_interpret's toyworld."""
