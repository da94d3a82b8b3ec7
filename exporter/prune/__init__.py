"""Prune stage: takes a Pipeline, a PruneSpec and calibration batches; gives the pruned pipeline and its plan.

importance/ scores weights or groups (one function per paper), masks.py and two_four.py turn scores into masks,
bake.py writes masks into the weights, structured/ removes channels and heads, recovery.py is the one training loop
(distillation from the dense UNet or the denoising loss, L1, fixed masks).
"""
