"""Head labels: which property each attention head carries (taxonomy, embedding and LLM labellers)."""

from .labellers import embedding_labels, load_vocabulary, taxonomy_labels, vote
from .llm import LLMConfig, llm_labels
from .runs import LABELLERS, find_textspan, format_labels, label_run
from .store import LABELS_FILE, head_labels, heads_with_property, normalise_property, read_labels

__all__ = ["LABELLERS", "LABELS_FILE", "LLMConfig", "embedding_labels", "find_textspan", "format_labels",
           "head_labels", "heads_with_property", "label_run", "llm_labels", "load_vocabulary",
           "normalise_property", "read_labels", "taxonomy_labels", "vote"]
