"""Model stage: takes a local diffusers pipeline dir; gives a loaded Pipeline behind its family adapter.

Loading and saving (safetensors only), the family adapters (components, conditioning, denoiser call, example
inputs), sampling with the pipeline's own scheduler, and calibration batches for the prune stage.
"""
