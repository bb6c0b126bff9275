"""Data: loading and validating corpus and QA files, the shipped sample, SQuAD import."""
