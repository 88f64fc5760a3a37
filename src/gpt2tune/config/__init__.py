"""The parameters: every key of params.yaml declared once, checked, documented."""
