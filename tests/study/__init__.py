"""Tests of clip_interpret's study."""
