"""Readers of real dataset formats (COCO captions, Karpathy split, easy-VQA) into plain example dicts."""
