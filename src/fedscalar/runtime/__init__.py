"""Runtimes move encoded messages between a server and its clients."""
