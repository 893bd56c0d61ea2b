"""Callbacks: throughput, memory and compile reports."""
