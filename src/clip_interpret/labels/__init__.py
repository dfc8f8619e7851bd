"""Head labels: which property each attention head carries."""

from .store import LABELS_FILE, head_labels, heads_with_property, normalise_property, read_labels

__all__ = ["LABELS_FILE", "head_labels", "heads_with_property", "normalise_property", "read_labels"]
