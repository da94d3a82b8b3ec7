"""Where the prune stage computes: one device (CPU or CUDA, with bf16/fp16 autocast) and, under `accelerate launch`
or `torchrun`, data-parallel ranks over torch.distributed. No launcher of our own: both launchers set RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT, and session() joins the process group they describe (gloo on CPU,
nccl on CUDA).

Every rank loads the whole pipeline and builds the whole (small) calibration set; what each stage splits:
  l1-grad's G, Diff-Pruning's Taylor sums   whole calibration batches per rank; the sums are all-reduced once
                                            (Taylor's per-timestep loss, a scalar, at every timestep: its stopping
                                            rule must be the same on every rank)
  LD-Pruner's output statistics             unit chunks per rank; every forward is the one a single process runs,
                                            so the scores are exactly a single process's
  EcoDiff's gates, recovery, distillation   each step's batch split by samples over the ranks; the gates' gradients
                                            all-reduced, the UNet's averaged by DistributedDataParallel
  losses (2:4 sensitivity, records)         whole batches per rank, sum and count all-reduced
So every rank derives its masks and kept units from the same all-reduced figures, and its weights from the same
averaged gradients: prune() checks that all ranks end with byte-identical models before rank 0 writes.

Sums in another order than one process's differ in the last bits (float addition is not associative), and a batch
split by samples runs kernels at another batch size: a plan on N ranks can differ from one process's where two
scores are within that rounding of each other (tests/test_distributed.py measures it on the tiny pipeline).

A function called without an engine (LOCAL) computes everything itself, on whatever device its model is.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch

from tinyprune.errors import BackendMissing, InputError, TinypruneError

AMP = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 autocast: losses are multiplied by this before the backward passes whose parameter gradients scores read
# (recovery uses torch's GradScaler instead). The gradient of a mean over ~10^5 latent elements is ~1e-5 per
# element, under fp16's smallest normal (6e-5); bf16 has fp32's exponent range and needs no scale.
FP16_LOSS_SCALE = 2.0**12


@dataclass(frozen=True)
class Engine:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: torch.dtype | None = None
    checkpointing: bool = False
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """The rank that writes (logs, the pruned pipeline)."""
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext()

    @property
    def loss_scale(self) -> float:
        return FP16_LOSS_SCALE if self.amp == torch.float16 else 1.0

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_scale).backward()

    def unscale(self, tensors, what: str) -> None:
        """Undo backward()'s loss scale on gradient sums, in place; fp16 overflow is an error, not a score."""
        if self.loss_scale == 1.0:
            return
        for t in tensors:
            if not torch.isfinite(t).all():
                raise TinypruneError(f"{what}: fp16 gradients overflowed; use --mixed-precision bf16 or no")
            t.div_(self.loss_scale)

    # ---- splitting work
    def shard(self, items: list) -> list:
        """This rank's whole items (calibration batches, unit chunks), round robin."""
        return items[self.rank::self.world]

    def part(self, n: int) -> slice:
        """This rank's contiguous share of n samples (empty where n < world)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    # ---- collectives (no-ops on one process)
    def sum_(self, tensors) -> None:
        """All-reduce (sum) in place, in the given order on every rank."""
        if self.world > 1:
            for t in tensors:
                torch.distributed.all_reduce(t)

    def sum_grads(self, params) -> None:
        """Sum the parameters' gradients over ranks; a rank that produced none contributes zeros."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)

    def total(self, *values: float) -> list[float]:
        """Python scalars summed over ranks (float64)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one: a wall-clock limit must stop all ranks at the same step."""
        return self.total(float(flag))[0] > 0

    def replicate(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as a training loop calls it: DistributedDataParallel on several ranks (gradients averaged in
        buckets during the backward pass), the model itself on one."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: a structured student's replacement modules and some families' UNets have
        # parameters a forward does not reach; DDP would otherwise wait for their gradients forever
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=True)

    def agree(self, what: str, models) -> None:
        """Raise unless every rank holds byte-identical `models` (masks, kept units and recovered weights)."""
        if self.world == 1:
            return
        h = hashlib.sha256()
        for model in models:
            for name, p in sorted(model.state_dict().items()):
                h.update(name.encode())
                h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        mine = torch.tensor(list(h.digest()[:8]), dtype=torch.float64, device=self.device)
        low, high = mine.clone(), mine.clone()
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise TinypruneError(f"{what}: the {self.world} ranks ended with different models (a non-deterministic "
                                 "kernel?); nothing was written")

    def from_main(self, fn):
        """fn() on rank 0 and its result on every rank (what is measured -- cost tables, timed allocations -- must
        be one rank's measurement, or the ranks would remove different units); its InputError is raised on all."""
        if self.world == 1:
            return fn()
        box = [None]
        if self.main:
            try:
                box = [(fn(), None)]
            except InputError as e:
                box = [(None, str(e))]
        torch.distributed.broadcast_object_list(box, src=0)
        value, message = box[0]
        if message is not None:
            raise InputError(message)
        return value

    def on_main(self, fn) -> None:
        """Run fn on rank 0 only (it touches the file system) and raise its InputError on every rank."""
        self.from_main(fn)

    # ---- placement
    @contextmanager
    def hosting(self, *models: torch.nn.Module):
        """The models on this engine's device for the block, back on the CPU after it: baking, saving and ONNX
        export read fp32 CPU weights as they always have."""
        if self.device.type == "cpu":
            yield
            return
        try:
            for m in models:
                m.to(self.device)
            yield
        finally:
            for m in models:
                m.to("cpu")
            torch.cuda.empty_cache()

    @contextmanager
    def checkpointed(self, model: torch.nn.Module):
        """diffusers' own gradient checkpointing of the UNet's blocks for the block (when asked for): activations
        are recomputed in the backward pass instead of kept."""
        if not self.checkpointing:
            yield
            return
        model.enable_gradient_checkpointing()
        try:
            yield
        finally:
            model.disable_gradient_checkpointing()


LOCAL = Engine()


def launched() -> bool:
    """Whether a launcher (accelerate launch, torchrun) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _device(choice: str) -> torch.device:
    if choice == "auto":  # `accelerate launch --cpu` says so in the environment
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        choice = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise BackendMissing("--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                             "use --device cpu or a CUDA build of torch")
    return torch.device(choice)


def _amp(choice: str | None) -> torch.dtype | None:
    # accelerate launch --mixed_precision exports its choice; our own option wins over it
    choice = choice or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if choice not in AMP:
        raise InputError(f"mixed precision '{choice}' (from accelerate launch) is not one the prune stage runs: "
                         f"{', '.join(AMP)}")
    return AMP[choice]


def local(compute) -> Engine:
    """The Engine of one process for a ComputeSpec (the device checked here, before any work)."""
    return Engine(_device(compute.device), _amp(compute.mixed_precision), compute.gradient_checkpointing)


@contextmanager
def session(compute):
    """The Engine of this process for a ComputeSpec: one process, or this rank of the launcher's process group
    (joined here and left at the end; one the caller already joined, e.g. through accelerate's Accelerator,
    is used as it is)."""
    engine = local(compute)
    if not launched():
        yield engine
        return
    device, local_rank = engine.device, int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    joined = not torch.distributed.is_initialized()
    if joined:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield replace(engine, device=device, rank=torch.distributed.get_rank(),
                      world=torch.distributed.get_world_size())
    finally:
        if joined:
            torch.distributed.destroy_process_group()
