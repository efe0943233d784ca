"""The Context-PEFT core: context vocabularies and routing plans, the adaptor kinds, their injection into a frozen
LM's Linear layers, the wrapped model and its losses. Imports nothing above it."""
