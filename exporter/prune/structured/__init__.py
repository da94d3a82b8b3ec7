"""Structured pruning: takes a UNet and group scores; gives a physically smaller UNet and what was removed.

The prunable groups (ResNet channels, heads, feed-forward widths) and the narrower modules are model/structure.py's;
here groups.py sums each unit's parameters for the scores, gates.py masks units by hooks while scoring, cost.py
prices each unit, allocation.py decides how many units each group keeps against that cost, surgery.py removes the
rest, and run.py ties the scores, allocation, surgery and recovery together.
"""
