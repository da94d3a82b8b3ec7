"""Judge stage: takes reference and candidate outputs; gives results that know their tolerance, and the verdict.

drift.py compares arrays and images (truthy when within tolerance), torch_runner.py runs the PyTorch side of a
comparison, runtime_check.py judges the bundle's torch-free runtime against PyTorch, quality.py is the digit
yardstick (FD, class accuracy, PSNR/SSIM, grids), gates.py applies a profile's quality gates, and checks.py is
the one list of checks export, validate and bench run, with the verdict over their results.
"""
