"""Adapter methods: the registry (torch-free), the shared protocol and one file per method."""
