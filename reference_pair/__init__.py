"""Builds the shipped reference model pair: a tokenizer, a target LM and a draft LM distilled from it.

Knows nothing about serving; its only output is standard Hugging Face model directories.
"""
