"""Bench stage: takes a bundle; gives latency (p50/p90/mean) and peak memory per component and generation.

latency.py measures backends side by side, memory.py reads peak RSS from /proc for every stage that reports it.
"""
