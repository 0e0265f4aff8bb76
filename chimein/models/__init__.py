"""Models: a preset's tokenizer and base model (4-bit NF4 or not) loaded in one place, trained
adapters (their metadata, their publishing to the Hub or the local store, and loading one on its
base), and the offline assets built from package-registry files (SmolLM2, the 7B families'
tokenizers, tiny random-weight models of each family)."""
