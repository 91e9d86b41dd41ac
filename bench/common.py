"""Shared pieces of the benchmarks (scripts, not tests: they print figures, assert nothing).

- the PyTorch reference: a random-weight transformers `BlipForImageTextRetrieval` at BLIP-base
  size (vision LayerNorm eps 1e-6, 12 text heads), written as a HF directory, and the same
  weights converted to our Flax tree by the project's converter (`weight_convert`);
- synthetic zero-shot inputs (ten-candidate groups, [ENC]-first descriptions of varied length);
- timing (interleaved rounds, medians), compile time, memory (peak RSS of a process that runs
  one variant only, and XLA's `memory_analysis`), machine load, and a table printer;
- the machine line every benchmark prints (`machine_line`): CPU model (lscpu), cores, GPU if
  any, both frameworks' float32 matmul GFLOP/s measured in that run, and the run's peak RSS;
- the device and precision of the PyTorch reference on CPU or CUDA (`torch_device`,
  `torch_autocast`).

Every benchmark runs the PyTorch reference in the same run on the same machine and reports
ratios, because absolute figures differ between machines (the CPU's kernel libraries) and on a
shared 2-core machine drift by ~10% between runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform as platform_lib
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

ENC_TOKEN_ID = 30523
VOCAB_SIZE = 30524
TEXT_LENGTH = 30          # ContextBLIP pads descriptions to 30 tokens (docs/method.md#tokenizer)
GROUP = 10                # IMAGECODE candidates per set


def load_average() -> str:
  """'1-min/5-min/15-min' load averages, printed with every benchmark (2 shared cores)."""
  return "/".join(f"{x:.2f}" for x in os.getloadavg())


def peak_rss_mb() -> float:
  """This process's peak resident set size in MiB: VmHWM of /proc/self/status, which starts
  afresh at exec (ru_maxrss would carry over the forking parent's peak)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
  """This process's current resident set size in MiB."""
  with open("/proc/self/statm") as f:
    pages = int(f.read().split()[1])
  return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# --------------------------------------------------------------------------------------------
# The machine line
# --------------------------------------------------------------------------------------------

# Instruction sets that decide the matmul kernels (AMX: PyTorch's bfloat16 runs on it, XLA's not).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


def cpu_model() -> str:
  """'Model name' of lscpu and which of ISA_FLAGS it has (the platform string when lscpu is
  missing)."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    return platform_lib.processor() or platform_lib.machine()
  fields = {k.strip().lower(): v.strip() for k, _, v in
            (line.partition(":") for line in out.splitlines())}
  flags = set(fields.get("flags", "").split())
  isa = " ".join(f for f in ISA_FLAGS if f in flags)
  return f"{fields.get('model name', platform_lib.machine())} [{isa or 'no avx2'}]"


def cpu_cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 0


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
  fn()                                   # warm-up (compile, allocation)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def torch_matmul_gflops(n: int = 4096, platform: str = "cpu", repeats: int = 3) -> float:
  """float32 n^3 `torch.matmul` rate (best of `repeats`), on the CPU or the CUDA GPU."""
  import torch
  apply_torch_precision()
  dev = torch_device(platform)
  a = torch.randn(n, n, device=dev)
  b = torch.randn(n, n, device=dev)
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

  def run():
    torch.matmul(a, b)
    sync()
  return 2 * n**3 / _best_seconds(run, repeats) / 1e9


def jax_matmul_gflops(n: int = 4096, repeats: int = 3, dtype: str = "float32") -> float:
  """n^3 jitted `jnp.dot` rate in `dtype` on the default device (best of `repeats`)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  dot = jax.jit(jnp.dot)
  return 2 * n**3 / _best_seconds(lambda: dot(a, b).block_until_ready(), repeats) / 1e9


def gpu_name() -> str:
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip()
    return out.splitlines()[0] if out else ""
  except (OSError, subprocess.SubprocessError):
    return ""


@dataclasses.dataclass
class Machine:
  """What a benchmark's figures were measured on (`measure_machine`, printed by `line`)."""
  cpu: str
  cores: int
  gpu: str
  matmul_n: int
  torch_gflops: float
  jax_gflops: float

  def line(self) -> str:
    gpu = f"  GPU {self.gpu}" if self.gpu else ""
    prec = os.environ.get("JAX_DEFAULT_MATMUL_PRECISION", "default")
    return (f"# machine: {self.cpu}, {self.cores} cores{gpu}; float32 ({prec}) {self.matmul_n}^3 matmul "
            f"torch {self.torch_gflops:.0f} GFLOP/s, jax {self.jax_gflops:.0f} GFLOP/s; "
            f"load {load_average()}; peak RSS {peak_rss_mb():.0f} MiB")


def measure_machine(platform: str = "cpu", n: int = 4096, log=print) -> Machine:
  """Both frameworks' float32 matmul rate in this run (n = 4096, or less when asked: a 4096^3
  matmul is 137 GFLOP, ~1 s at 150 GFLOP/s)."""
  m = Machine(cpu_model(), cpu_cores(), gpu_name() if platform == "gpu" else "", n,
              torch_matmul_gflops(n, platform), jax_matmul_gflops(n))
  log(m.line())
  return m


def torch_device(platform: str) -> str:
  """'cuda' on a GPU machine, else 'cpu'."""
  return "cuda" if platform == "gpu" else "cpu"


def torch_autocast(platform: str, dtype: str):
  """torch.autocast to bfloat16 for dtype 'bfloat16' (weights stay float32, as JAX's
  compute_dtype does); a no-op context for float32."""
  if dtype == "float32":
    return contextlib.nullcontext()
  import torch
  return torch.autocast(torch_device(platform), dtype=getattr(torch, dtype))


PRECISIONS = ("highest", "tf32")


def add_compute_args(p, platform: bool = True) -> None:
  """The device and arithmetic flags every benchmark takes: --platform (when it runs a
  framework choice of device), --dtype and --precision (`set_precision`)."""
  if platform:
    p.add_argument("--platform", default="", choices=("", "cpu", "gpu"),
                   help="'' = gpu when nvidia-smi sees one, else cpu")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype: JAX model.compute_dtype (parameters stay float32), "
                      "torch autocast")
  p.add_argument("--precision", default="highest", choices=PRECISIONS,
                 help="float32 matmul precision of both frameworks (GPU only: 'tf32' = "
                      "TensorFloat-32 tensor cores in both)")


def set_precision(precision: str, dtype: str = "float32") -> None:
  """float32 matmul precision of both frameworks for this process and its workers (call before
  jax is imported). 'highest': true float32 products in both (JAX
  `jax_default_matmul_precision=highest`; torch with TF32 off for cuBLAS and cuDNN);
  'tf32': TensorFloat-32 tensor cores in both (JAX 'tensorfloat32'; torch TF32 on). It matters
  on GPUs only: XLA:CPU and PyTorch's CPU kernels compute float32 products in float32 either
  way. A bfloat16 run keeps each framework's default (its products are bfloat16 already)."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
  if dtype != "float32":
    return
  os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = (
      "highest" if precision == "highest" else "tensorfloat32")
  os.environ["CONTEXTBLIP_BENCH_TF32"] = "1" if precision == "tf32" else "0"


def apply_torch_precision() -> None:
  """torch's TF32 switches as `set_precision` chose (inherited by worker processes)."""
  flag = os.environ.get("CONTEXTBLIP_BENCH_TF32")
  if flag is None:
    return
  import torch
  torch.backends.cuda.matmul.allow_tf32 = flag == "1"
  torch.backends.cudnn.allow_tf32 = flag == "1"


def default_platform() -> str:
  """'gpu' when an NVIDIA GPU is visible (nvidia-smi answers), else 'cpu'."""
  return "gpu" if gpu_name() else "cpu"


# --------------------------------------------------------------------------------------------
# The PyTorch reference and its conversion
# --------------------------------------------------------------------------------------------

def hf_base_config(image_size: int = 224):
  """transformers BlipConfig for BLIP-base with BLIP's own settings made explicit."""
  from transformers import BlipConfig as HFBlipConfig
  return HFBlipConfig(
      vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, image_size=image_size, patch_size=16,
                         layer_norm_eps=1e-6, attention_dropout=0.0),
      text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=768, num_hidden_layers=12,
                       num_attention_heads=12, intermediate_size=3072,
                       max_position_embeddings=512, encoder_hidden_size=768,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
      image_text_hidden_size=256)


def build_reference_dir(path: str, image_size: int = 224, seed: int = 0) -> str:
  """Writes a random-weight BLIP-base `BlipForImageTextRetrieval` HF directory at `path`.

  Weights N(0, 0.02), LayerNorm weights 1 + N(0, 0.1) (HF's own vision init is ~1e-10, which
  would make denormal-heavy, unrepresentative arithmetic)."""
  import torch
  from transformers import BlipForImageTextRetrieval
  if os.path.isfile(os.path.join(path, "config.json")):
    return path
  torch.manual_seed(seed)
  model = BlipForImageTextRetrieval(hf_base_config(image_size)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and "norm" in name.lower() and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.02 * torch.randn_like(p))
  model.save_pretrained(path)
  return path


def load_reference(path: str):
  """The PyTorch reference in eval mode (float32, CPU)."""
  from transformers import BlipForImageTextRetrieval
  apply_torch_precision()
  return BlipForImageTextRetrieval.from_pretrained(path).eval()


def convert_reference(path: str):
  """(BlipConfig, Blip params) of the HF directory, through the project's converter."""
  from weight_convert.converter import to_flax
  from weight_convert.loaders import load_source
  conv = to_flax(load_source(path, "hf"), hf_config="blip")
  return conv.config, conv.params["pretrained_blip"]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ZeroShotSet:
  """One IMAGECODE-like set: 10 candidate images and its descriptions."""
  pixels: np.ndarray        # [10, S, S, 3] float32, normalised, NHWC
  ids: np.ndarray           # [d, T] int32, [ENC] first, [SEP], [PAD]=0
  mask: np.ndarray          # [d, T] int32


def description_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
  """Token counts incl. [ENC]/[SEP]; IMAGECODE descriptions average ~23 words, most hit 30."""
  return np.clip(rng.normal(25, 5, n).round().astype(int), 8, TEXT_LENGTH)


def make_sets(descriptions_per_set: Sequence[int], image_size: int = 224,
              seed: int = 0) -> list[ZeroShotSet]:
  rng = np.random.default_rng(seed)
  sets = []
  for d in descriptions_per_set:
    pixels = rng.standard_normal((GROUP, image_size, image_size, 3), dtype=np.float32)
    ids = np.zeros((d, TEXT_LENGTH), np.int32)
    mask = np.zeros((d, TEXT_LENGTH), np.int32)
    for j, n in enumerate(description_lengths(rng, d)):
      ids[j, 0], ids[j, n - 1] = ENC_TOKEN_ID, 102
      ids[j, 1:n - 1] = rng.integers(1000, 30000, n - 2)
      mask[j, :n] = 1
    sets.append(ZeroShotSet(pixels, ids, mask))
  return sets


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Variant:
  """A named way to run the workload. `prepare()` builds, compiles and warms up (timed as the
  variant's first-call cost) and returns (run, scores): `run()` runs the whole workload once
  and returns its scores."""
  name: str
  prepare: Callable[[], tuple[Callable[[], Any], Any]]
  kind: str = "jax"               # 'torch' or 'jax' (for the table)
  units: float = 1.0              # workload units (groups, descriptions) one run processes
  notes: str = ""
  run: Callable[[], Any] | None = None
  compile_s: float = float("nan")
  times: list[float] = dataclasses.field(default_factory=list)
  scores: Any = None
  extra: dict = dataclasses.field(default_factory=dict)

  @property
  def median(self) -> float:
    return statistics.median(self.times) if self.times else float("nan")

  @property
  def best(self) -> float:
    return min(self.times) if self.times else float("nan")

  @property
  def rate(self) -> float:
    """Units per second (median run)."""
    return self.units / self.median

  @property
  def best_rate(self) -> float:
    """Units per second (fastest run: the least disturbed by other processes)."""
    return self.units / self.best


def measure(variants: Sequence[Variant], rounds: int, log=print) -> None:
  """Prepares every variant (first-call cost = build + compile + one warm-up run), then runs
  `rounds` interleaved rounds (v1, v2, ..., v1, v2, ...) so that load changes hit all variants
  alike."""
  for v in variants:
    t0 = time.perf_counter()
    v.run, scores = v.prepare()
    v.scores = np.asarray(scores)
    v.compile_s = time.perf_counter() - t0
    log(f"  prepared {v.name:<22s} first call {v.compile_s:7.1f} s   load {load_average()}")
  for r in range(rounds):
    for v in variants:
      t0 = time.perf_counter()
      v.run()
      v.times.append(time.perf_counter() - t0)
    log(f"  round {r + 1}/{rounds}: " + "  ".join(f"{v.name} {v.times[-1]:.2f}s" for v in variants)
        + f"   load {load_average()}")


def print_table(variants: Sequence[Variant], unit: str, baselines: dict[str, str],
                reference_scores: np.ndarray | None = None,
                memory: dict[str, dict] | None = None, log=print) -> list[dict]:
  """Prints one row per variant: units per run, median and best (fastest) s/run, `unit`/s
  (median), throughput ratios to each baseline from the medians and from the best runs,
  first-call (compile) time, memory, max |score - reference| over the scores both computed.
  Returns the rows (for --json)."""
  rows = []
  by_name = {v.name: v for v in variants}
  hdr = (f"{'variant':<22s} {unit:>6s} {'median s':>9s} {'best s':>7s} {unit + '/s':>9s} "
         + " ".join(f"{'x ' + k + ' med/best':>18s}" for k in baselines)
         + f" {'first s':>8s} {'peak MiB':>9s} {'xla MiB':>8s} {'max|dscore|':>11s}")
  log(hdr)
  log("-" * len(hdr))
  for v in variants:
    row = dict(variant=v.name, kind=v.kind, units=v.units, median_s=v.median, best_s=v.best,
               rate=v.rate, best_rate=v.best_rate, first_call_s=v.compile_s, times=v.times,
               notes=v.notes, **v.extra)
    ratios = []
    for label, base in baselines.items():
      b = by_name.get(base)
      med = v.rate / b.rate if b else float("nan")
      best = v.best_rate / b.best_rate if b else float("nan")
      row[f"x_{label}"], row[f"x_{label}_best"] = med, best
      ratios.append(f"{med:>10.2f} /{best:>5.2f}")
    mem = (memory or {}).get(v.name, {})
    row["peak_rss_mib"] = mem.get("peak_rss_mib", float("nan"))
    xla = v.extra.get("xla_bytes")
    diff = float("nan")
    if reference_scores is not None and v.scores is not None:
      n = min(len(reference_scores), len(v.scores))
      diff = float(np.max(np.abs(np.asarray(v.scores[:n], np.float64) - reference_scores[:n])))
    row["max_abs_score_diff"] = diff
    log(f"{v.name:<22s} {v.units:>6g} {v.median:>9.2f} {v.best:>7.2f} {v.rate:>9.3f} "
        + " ".join(ratios) + f" {v.compile_s:>8.1f} {row['peak_rss_mib']:>9.0f} "
        + f"{(xla / 2**20 if xla else float('nan')):>8.0f} {diff:>11.2e}")
    rows.append(row)
  return rows


def jax_memory_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries of a compiled JAX executable (XLA's own account)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


# --------------------------------------------------------------------------------------------
# One variant per process (for peak memory)
# --------------------------------------------------------------------------------------------

def run_isolated(script: str, args: Sequence[str], env: dict | None = None,
                 timeout: int = 900) -> dict:
  """Runs `python script *args` and parses the last stdout line as JSON."""
  proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, **(env or {})})
  if proc.returncode != 0:
    raise RuntimeError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])
