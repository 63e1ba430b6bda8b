"""Hugging Face import and export: config and weight-name mapping, our STEM modeling file."""
