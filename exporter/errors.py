"""One exception tree; the CLI maps each class to its exit code and prints one line.

The classes live in runtime/errors.py because the torch-free runtime is copied whole into every bundle and must
raise the same errors there without tinyprune installed; this module is where the rest of the package takes them.
"""

from tinyprune.runtime.errors import BackendMissing, GateFailed, InputError, TinypruneError

__all__ = ["BackendMissing", "GateFailed", "InputError", "TinypruneError"]
