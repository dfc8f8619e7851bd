"""The decomposition's conventions and its default, written once (without importing torch, so the
command line's parser can name them): see docs/decomposition.md for what each means."""

CONVENTIONS = ("centred", "published")
DEFAULT_CONVENTION = "centred"  # every default refers to it; runs written before manifests recorded a convention
#                                 were decomposed with it too
