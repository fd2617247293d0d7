"""The training loop every stage shares: one code path for one process and for `torchrun` with FSDP2.

A stage (pretrain, SFT, reward model, PPO) hands the loop a module whose forward takes a batch and returns
the mean loss, a function giving the batch of (step, micro-step), an optional evaluation and a function that
writes the model as a Hugging Face directory. The loop owns the rest: processes and devices, FSDP2 sharding
applied from outside the model (torchtitan's order: activation checkpointing, compile, shard), AdamW with
decay on matrices only (or Muon for the layers' matrices), warmup + cosine to a floor, accumulation, clipping,
the NaN guard, metrics, the progress bar, and checkpoints that resume exactly.

A checkpoint is `checkpoints/<stage>/step-NNNNNNN/`: `model/` (a HF directory anyone can load), `state/`
(model + optimizer through torch.distributed.checkpoint, so any world size can load it), `rng-<rank>.pt`
and `trainer.json` (step, samples seen, the config). It is written as `*.tmp` and renamed when complete,
and `latest` names the newest. The schedule and the data position are functions of the step, so the step
is all the loop needs to continue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from qianwen.model import Block
from qianwen.train.muon import StackedMuon
from qianwen.util import atomic_write

# Dense bf16 peaks (TFLOP/s) by device name, for MFU on GPUs; a CPU's peak is measured.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


@dataclass
class LoopConfig:
    steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak (QWEN_SPEC.md section 5)
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    optimizer: str = "adamw"  # or "muon": Muon for the layers' matrices, AdamW (above) for the rest; or "auto"
    muon_lr: float = 0.02  # Muon's peak rate, on the same schedule as lr
    muon_momentum: float = 0.95
    muon_ns_dtype: str = "auto"  # Newton-Schulz in bf16 where the hardware multiplies it (CUDA, AMX), else fp32
    grad_clip: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto = cuda:<local rank> when there is a GPU, else cpu
    dtype: str = "auto"  # auto = bf16 autocast on CUDA and on CPUs with AMX, fp32 elsewhere; or fp32 / bf16
    compile: bool = False
    activation_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    peak_tflops: float = 0.0  # for MFU; 0 = measured on a CPU, looked up for known GPUs

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip", "peak_tflops"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}.")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be positive and min_lr_ratio in [0, 1]; got {self.lr} and {self.min_lr_ratio}.")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"dtype must be auto, fp32 or bf16, got {self.dtype!r}.")
        if self.optimizer not in ("adamw", "muon", "auto"):
            raise ValueError(f"optimizer must be adamw, muon or auto, got {self.optimizer!r}.")
        if self.muon_ns_dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"muon_ns_dtype must be auto, bf16 or fp32, got {self.muon_ns_dtype!r}.")
        if not self.muon_lr > 0:
            raise ValueError(f"muon_lr must be positive, got {self.muon_lr}.")


class TrainingError(RuntimeError):
    """Training cannot go on (a diverged loss); the message says what to do."""


def lr_at(step: int, config: LoopConfig) -> float:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio of it at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_flops_per_token(model_config, seq_length: int) -> float:
    """6N for the matmuls (the embedding lookup is none) plus causal attention's scores and values (PaLM)."""
    n = model_config.num_params - model_config.vocab_size * model_config.hidden_size
    return 6 * n + 6 * model_config.num_layers * model_config.num_heads * model_config.head_dim * seq_length


# ---------------------------------------------------------------------------
# Processes and devices


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device
    mesh: object | None  # a DeviceMesh when world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.AVG if value.is_cuda else dist.ReduceOp.SUM)
            if not value.is_cuda:
                value /= self.world  # gloo has no AVG
        return value

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_runtime(device: str) -> Runtime:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1); otherwise one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a torch device; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device} asks for a GPU but torch sees no CUDA device; use device=cpu or auto.")
        if dev.index is None:  # plain `cuda`: this process's own GPU (set_device refuses a device without an index)
            dev = torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if dev.index >= count:
            raise ValueError(
                f"device={device} means GPU {dev.index} for this process, but torch sees {count}; name one of "
                f"cuda:0 to cuda:{count - 1}, or start at most {count} process(es) per machine."
            )
        torch.cuda.set_device(dev)
    if world == 1:
        return Runtime(0, 1, dev, None)
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    mesh = init_device_mesh(dev.type, (world,))
    return Runtime(dist.get_rank(), world, dev, mesh)


def shutdown(runtime: Runtime) -> None:
    if runtime.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def prepare(module: nn.Module, config: LoopConfig, runtime: Runtime) -> nn.Module:
    """Activation checkpointing, compile and FSDP2 on every transformer block, then the root; once per module,
    so a second stage (the reward model's fine-tuning after PMP) trains the same prepared module."""
    module.to(runtime.device)
    if getattr(module, "_qianwen_prepared", False):
        return module
    module._qianwen_prepared = True
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    if config.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in blocks:
            checkpoint(block)  # composable: parameter names stay as they are
    if config.compile:
        for block in blocks:
            block.compile()  # in place, so the state dict keeps its names
    if runtime.world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        bf16 = autocast_dtype(config, runtime) is not None
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kwargs = {"mesh": runtime.mesh, **({"mp_policy": policy} if policy else {})}
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(module, **kwargs)
    return module


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX): there bf16 autocast trains the tiny
    recipe's model 1.4x faster than fp32 (benchmarks/ANALYSIS.md); elsewhere bf16 is emulated, and slower."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def native_bf16(runtime: Runtime) -> bool:
    """Whether the device multiplies bf16 matrices in hardware (CUDA, AMX CPUs)."""
    return runtime.device.type == "cuda" or (runtime.device.type == "cpu" and cpu_has_bf16_matmul())


def autocast_dtype(config: LoopConfig, runtime: Runtime) -> torch.dtype | None:
    """bf16 when asked, or under `auto` where the hardware computes in it (CUDA, AMX CPUs); else None (fp32)."""
    if config.dtype == "bf16" or (config.dtype == "auto" and native_bf16(runtime)):
        return torch.bfloat16
    return None


def optimizer_name(config: LoopConfig, runtime: Runtime) -> str:
    """`auto`: Muon in one process, AdamW in several. Muon orthogonalises each update with Newton-Schulz
    matmuls (torch.optim.Muon's, batched by shape: qianwen/train/muon.py), about half a tiny-recipe step's FLOPs
    at its 1k-token batches: 13% more time a step in bf16 with AMX; on a CPU without bf16 units, bf16 is
    emulated (2.4x a fp32 AdamW step) and they run in fp32 instead (1.4x), which at the tiny recipe's budget
    still pays: AdamW there learns neither the facts nor to copy numbers (benchmarks/ANALYSIS.md). Under FSDP2
    those matmuls run on sharded DTensors, which gather what each product needs: right (tests/test_pretrain.py),
    but their cost across GPUs is unmeasured, so `auto` leaves several processes on AdamW."""
    if config.optimizer != "auto":
        return config.optimizer
    return "muon" if runtime.world == 1 else "adamw"


def muon_ns_dtype(config: LoopConfig, runtime: Runtime) -> torch.dtype:
    """The dtype of Muon's Newton-Schulz products: bf16 where the hardware multiplies it, fp32 elsewhere (under
    `auto`). Sharded parameters (torchrun) take torch.optim.Muon's own step, which is bf16."""
    if config.muon_ns_dtype == "auto":
        return torch.bfloat16 if native_bf16(runtime) else torch.float32
    return torch.bfloat16 if config.muon_ns_dtype == "bf16" else torch.float32


def make_optimizers(
    module: nn.Module,
    config: LoopConfig,
    device: torch.device,
    name: str = "adamw",
    ns_dtype: torch.dtype = torch.bfloat16,
) -> list[torch.optim.Optimizer]:
    """AdamW with weight decay on matrices (embeddings included) only, never on biases or norm gains; with
    `name = "muon"`, Muon takes the transformer layers' matrices and AdamW the embeddings, the output head,
    biases and gains (Muon orthogonalises a whole matrix's update, which suits hidden layers, not a lookup table
    or the head). Each parameter group's `lr_scale` is its peak rate over `lr`."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    muon = [p for n, p in named if name == "muon" and p.ndim == 2 and "layers." in n]
    taken = {id(p) for p in muon}
    rest = [p for _, p in named if id(p) not in taken]
    groups = [
        {"params": [p for p in rest if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernel: on a CPU a fifth of the default's time (5 against 25 ms a step for 9M parameters).
    fused = device.type in ("cuda", "cpu") or None
    adamw = torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=fused,
        foreach=None,
    )
    if not muon:
        return [adamw]
    # Decoupled decay is lr * weight_decay per step: scaled so Muon's matrices decay as fast as AdamW's would.
    scale = config.muon_lr / config.lr
    matrices = StackedMuon(
        [{"params": muon, "lr_scale": scale}],
        lr=config.muon_lr,
        weight_decay=config.weight_decay / scale,
        momentum=config.muon_momentum,
        ns_dtype=ns_dtype,
    )
    return [matrices, adamw]


def peak_flops(config: LoopConfig, device: torch.device, dtype: torch.dtype | None = None) -> float | None:
    """FLOP/s the hardware can do: the configured peak, a known GPU's, or a CPU's measured matmul rate in the
    dtype the training computes in (`dtype`, None for fp32)."""
    if config.peak_tflops:
        return config.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((t * 1e12 for key, t in GPU_PEAK_TFLOPS.items() if key in name), None)
    if device.type != "cpu":
        return None
    n = 1024
    gen = torch.Generator().manual_seed(0)  # its own stream: timing must not move the training's randomness
    a, b = (torch.randn(n, n, generator=gen).to(dtype or torch.float32) for _ in range(2))
    a @ b
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------
# The loop


@dataclass
class Stage:
    """What a stage hands the loop."""

    name: str
    module: nn.Module  # forward(batch) -> mean loss
    batch: Callable[[int, int], object]  # (step, micro-step) -> this process's batch
    export: Callable[[dict, Path], None]  # (full state dict, dir) -> writes a HF directory (main process)
    tokens_per_step: int = 0  # global, for tokens/s
    flops_per_token: float = 0.0  # for MFU
    evaluate: Callable[[], dict] | None = None  # metrics on held-out data; every process takes part


class Trainer:
    def __init__(self, stage: Stage, config: LoopConfig, run_dir: str | os.PathLike, runtime: Runtime):
        self.stage, self.config, self.runtime = stage, config, runtime
        self.run_dir = Path(run_dir)
        self.checkpoints = self.run_dir / "checkpoints" / stage.name
        self.metrics_path = self.run_dir / "metrics" / f"{stage.name}.jsonl"
        self.module = prepare(stage.module, config, runtime)
        self.optimizer_name = optimizer_name(config, runtime)
        self.optimizers = make_optimizers(
            self.module, config, runtime.device, self.optimizer_name, muon_ns_dtype(config, runtime)
        )
        self.autocast = autocast_dtype(config, runtime)
        self.step = 0
        self.history: list[dict] = []

    # -- checkpoints ----------------------------------------------------------

    def latest(self) -> Path | None:
        return latest_checkpoint(self.checkpoints, "trainer.json")

    def save(self) -> Path:
        from torch.distributed.checkpoint import save as dcp_save
        from torch.distributed.checkpoint.state_dict import get_state_dict

        rng = rng_state()  # saving must not move the random streams, or a resumed run would differ
        name = f"step-{self.step:07d}"
        final, tmp = self.checkpoints / name, self.checkpoints / f"{name}.tmp"
        if self.runtime.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.runtime.barrier()
        model_state, optim_state = get_state_dict(self.module, self.optimizers)
        with single_process_quiet():
            dcp_save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / "state")
        torch.save(rng, tmp / f"rng-{self.runtime.rank}.pt")
        self.export(tmp / "model")
        if self.runtime.main:
            trainer = {
                "stage": self.stage.name,
                "step": self.step,
                "tokens_seen": self.step * self.stage.tokens_per_step,
                "world_size": self.runtime.world,
                "optimizer": self.optimizer_name,
                "config": dataclasses.asdict(self.config),
            }
            atomic_write(tmp / "trainer.json", json.dumps(trainer, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            atomic_write(self.checkpoints / "latest", name)
            kept = sorted(p for p in self.checkpoints.glob("step-*") if not p.name.endswith(".tmp"))
            for old in kept[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.runtime.barrier()
        set_rng_state(rng)
        return final

    def resume(self) -> int:
        """Load the newest checkpoint; returns its step (0 when there is none)."""
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = self.latest()
        if path is None:
            return 0
        trainer = json.loads((path / "trainer.json").read_text())
        saved = trainer.get("optimizer", "adamw")
        if saved != self.optimizer_name:
            raise ValueError(
                f"{path} was trained with {saved} and this run would use {self.optimizer_name} (optimizer="
                f"{self.config.optimizer!r}); set optimizer={saved} to resume it (muon needs one process), or "
                "start afresh in another out directory."
            )
        model_state, optim_state = get_state_dict(self.module, self.optimizers)
        state = {"model": model_state, "optim": optim_state}
        with single_process_quiet():
            dcp_load(state, checkpoint_id=path / "state")
        set_state_dict(self.module, self.optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng = path / f"rng-{self.runtime.rank}.pt"
        if rng.is_file():  # a different world size has no state for new ranks: they keep their seed
            set_rng_state(torch.load(rng, weights_only=False))
        self.step = trainer["step"]
        self._truncate_metrics(self.step)
        return self.step

    def export(self, directory: Path) -> None:
        """The model as a HF directory: the full state dict is gathered (every process), written by rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.module, options=options)
        if self.runtime.main:
            self.stage.export(state, directory)

    def publish(self, directory: Path) -> Path:
        """The newest checkpoint's model as `directory` (base/, sft/ ...), replaced whole (main process)."""
        latest = self.latest()
        write_model_dir(directory, lambda tmp: shutil.copytree(latest / "model", tmp))
        return directory

    # -- metrics ----------------------------------------------------------------

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.runtime.main:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """Forget what was logged after the checkpoint: those steps run again."""
        if not self.runtime.main or not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        atomic_write(self.metrics_path, "".join(line + "\n" for line in kept))

    # -- training ---------------------------------------------------------------

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches; the loss averaged over processes, the grad norm."""
        config, module = self.config, self.module
        total = torch.zeros((), device=self.runtime.device)
        for micro in range(config.grad_accum):
            if hasattr(module, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last micro-step only
                module.set_requires_gradient_sync(micro == config.grad_accum - 1)
            batch = self.stage.batch(self.step, micro)
            with self._autocast():
                loss = module(*batch) if isinstance(batch, tuple) else module(batch)
            (loss / config.grad_accum).backward()
            total += loss.detach().float()
        loss = self.runtime.mean(total / config.grad_accum)
        if not torch.isfinite(loss):
            self._diverged(f"the loss became {loss.item()}")
        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if not torch.isfinite(norm):
            self._diverged(f"the gradient norm became {norm.item()}")
        lr = lr_at(self.step, config)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, norm

    def _diverged(self, what: str) -> None:
        last = self.latest()
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise TrainingError(
            f"{what} at step {self.step + 1}; {kept}. Lower lr or raise warmup_steps, then --resume to go on."
        )

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.autocast)

    def evaluate(self) -> None:
        if self.stage.evaluate is None:
            return
        self.module.eval()
        with torch.no_grad(), self._autocast():
            result = self.stage.evaluate()
        self.module.train()
        self.log({"step": self.step, **result})

    def fit(self, resume: bool = False) -> list[dict]:
        """Train to config.steps; returns the metrics records of this run."""
        config = self.config
        if self.latest() is not None:
            if not resume:
                raise ValueError(
                    f"{self.checkpoints} already holds checkpoints; pass --resume to continue, or choose another --out."
                )
            self.resume()
        elif self.runtime.main and self.metrics_path.exists():
            self.metrics_path.unlink()  # a run that never reached a checkpoint starts over
        if self.step == 0:  # dropout's randomness; a resumed run has its saved RNG state instead
            torch.manual_seed(config.seed + self.runtime.rank)
        peak = peak_flops(config, self.runtime.device, self.autocast)
        self.module.train()
        progress = _progress(config.steps, self.step, self.runtime.main)
        window_start, window_steps = time.perf_counter(), 0
        while self.step < config.steps:
            loss, norm = self.train_step()
            window_steps += 1
            last = self.step == config.steps
            if self.step % config.log_every == 0 or last or self.step == 1:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": self.step,
                    "loss": round(loss.item(), 6),
                    "lr": lr_at(self.step - 1, config),
                    "grad_norm": round(norm.item(), 6),
                    "steps_per_s": round(window_steps / elapsed, 3),
                }
                if self.stage.tokens_per_step:  # fixed-size batches (pretraining); SFT's vary
                    tokens_per_s = self.stage.tokens_per_step * window_steps / elapsed
                    record["tokens"] = self.step * self.stage.tokens_per_step
                    record["tokens_per_s"] = round(tokens_per_s, 1)
                    if peak and self.stage.flops_per_token:
                        flops = tokens_per_s * self.stage.flops_per_token / self.runtime.world
                        record["mfu"] = round(flops / peak, 4)
                self.log(record)
                progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                window_start, window_steps = time.perf_counter(), 0
            if (config.eval_every and self.step % config.eval_every == 0) or last:
                self.evaluate()
                window_start = time.perf_counter() if window_steps == 0 else window_start
            if (config.save_every and self.step % config.save_every == 0) or last:
                self.save()
                window_start = time.perf_counter() if window_steps == 0 else window_start
            progress.update(1)
        progress.close()
        return self.history


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, file=sys.stderr, unit="step", dynamic_ncols=True)


@contextlib.contextmanager
def single_process_quiet():
    """torch.distributed.checkpoint warns that it runs in one process; for us that is the normal case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def latest_checkpoint(checkpoints: Path, marker: str) -> Path | None:
    """The checkpoint `checkpoints/latest` names, if its `marker` file (written last) is there."""
    pointer = checkpoints / "latest"
    if not pointer.is_file():
        return None
    path = checkpoints / pointer.read_text().strip()
    return path if (path / marker).is_file() else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def hf_export(model_config, tokenizer, metadata: dict) -> Callable[[dict, Path], None]:
    """A Stage.export that writes a qianwen Transformer's full state dict (keys under `model.`, as a
    CausalLM holds it) as a Hugging Face directory with the tokenizer; `metadata` is read at export time."""

    def export(state: dict, directory: Path) -> None:
        import qianwen
        from qianwen.model import Transformer

        with torch.device("meta"):
            model = Transformer(model_config)
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, assign=True)
        qianwen.save(model, tokenizer, directory, metadata)

    return export


def write_model_dir(directory: Path, write: Callable[[Path], None]) -> None:
    """Replace `directory` by a complete new one: written beside it, then renamed into place."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
