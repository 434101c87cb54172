"""Hugging Face interoperability: transformers' MoE families in and out of dynamoe, and dynamoe's
experts inside transformers."""
