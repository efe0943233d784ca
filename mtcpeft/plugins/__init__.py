"""Plugins on disk: the manifest and its tensors (one format, one loader), the merger that builds unified plugins,
and PEFT interop."""
