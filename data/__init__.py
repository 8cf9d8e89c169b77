"""Datasets, vocabulary and image loading for captioning."""
