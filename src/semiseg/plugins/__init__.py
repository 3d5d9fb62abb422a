"""Plug-ins that attach to any method (SUFD, MPMC); importing this package registers them."""
